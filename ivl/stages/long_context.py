"""Stage III: long-sequence SFT (packed sequences up to 32K tokens) with LoRA adapters from peft."""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, LoraModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ivl.stages.instruct import InstructModule

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LongContextModule(InstructModule):
    """Instruction tuning on long packed sequences with LoRA on ``target_modules`` of the language model; only
    the adapters train. Checkpoints carry the adapter
    (``checkpoint["lora_adapter"]``); at the end, ``save_dir`` gets the merged plain checkpoint and the adapter
    (``adapter/``), so either can be loaded.

    Args:
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale and dropout.
        target_modules: module names (or regex) to adapt; default every projection of attention, GDN and MLPs.
    """

    def __init__(self, *args, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                 target_modules: list[str] | str | None = None, **kwargs):
        kwargs.setdefault("trainable", [r".*lora_.*"])
        super().__init__(*args, **kwargs)

    def adapt_model(self) -> None:
        h = self.hparams
        self.lora_config = LoraConfig(
            r=h.lora_r, lora_alpha=h.lora_alpha, lora_dropout=h.lora_dropout,
            target_modules=h.target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj",
                                                "up_proj", "down_proj"],
        )
        # LoraModel injects adapters into model.lm in place and knows how to merge them back; it stays out of the
        # module tree so that checkpoints hold the weights once.
        self.__dict__["lora"] = LoraModel(self.model.lm, self.lora_config, "default")

    def adapter_state_dict(self) -> dict:
        return get_peft_model_state_dict(self.model.lm)

    def load_adapter_state_dict(self, state: dict) -> None:
        set_peft_model_state_dict(self.model.lm, state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lora_adapter"] = {k: v.detach().cpu() for k, v in self.adapter_state_dict().items()}

    def save_adapter(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.adapter_state_dict().items()}, directory / ADAPTER_WEIGHTS)
        config = self.lora_config.to_dict()
        config["target_modules"] = sorted(config["target_modules"]) if isinstance(config["target_modules"], set) \
            else config["target_modules"]
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))

    def load_adapter(self, directory: Path) -> None:
        self.load_adapter_state_dict(load_file(directory / ADAPTER_WEIGHTS))

    def export(self, directory: Path) -> None:
        """The adapter (adapter/) and the student with the adapter merged in (a plain InfiniteVL checkpoint)."""
        self.save_adapter(directory / "adapter")
        self.model.lm = self.lora.merge_and_unload()
        self.model.save_pretrained(directory)
