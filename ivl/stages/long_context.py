"""Stage III: long-sequence SFT (packed sequences up to 32K tokens) with LoRA adapters from peft."""

from __future__ import annotations

from pathlib import Path

from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from ivl.stages import lora
from ivl.stages.instruct import InstructModule


class LongContextModule(InstructModule):
    """Instruction tuning on long packed sequences with LoRA on ``target_modules`` of the language model; only
    the adapters train (``trainable`` defaults to them). Checkpoints hold the adapters with the rest of the model;
    at the end, ``save_dir`` gets the student with the adapters merged in (a plain checkpoint) and ``adapter/``
    (peft's files).

    Args:
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale and dropout.
        target_modules: module names (or regex) to adapt; default every projection of attention, GDN and MLPs.
    """

    # A class default, not a keyword default: the CLI passes trainable=None explicitly, which would otherwise fall
    # back to InstructModule's whole language model.
    default_trainable = tuple(lora.TRAINABLE)

    def __init__(
        self,
        *args,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.lora_config = lora.lora_config(lora_r, lora_alpha, lora_dropout, target_modules)

    def load_adapter(self, directory: Path) -> None:
        """Load adapter files written by ``export`` (``<save_dir>/adapter``) into this module's adapters."""
        set_peft_model_state_dict(
            self.model.lm, load_file(Path(directory) / lora.ADAPTER_WEIGHTS), adapter_name=lora.ADAPTER
        )
