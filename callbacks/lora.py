"""LoRAInjection: add peft LoRA adapters to a stage's language model before its optimiser is built."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, inject_adapter_in_model, get_peft_model_state_dict


class LoRAInjection(Callback):
    """Injects LoRA into ``pl_module.<attribute>`` (default the student's language model) in ``setup``, which runs
    before ``configure_optimizers``; with ``only_adapters`` everything else stops training. Checkpoints then
    carry the adapter weights (in the state dict, and separately under ``lora_adapter``)."""

    def __init__(self, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: list[str] | None = None,
                 attribute: str = "model.lm", only_adapters: bool = True):
        self.config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                 target_modules=target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"])
        self.attribute, self.only_adapters = attribute, only_adapters
        self._injected = False

    def _target(self, pl_module):
        module = pl_module
        for part in self.attribute.split("."):
            module = getattr(module, part)
        return module

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._injected:
            return
        inject_adapter_in_model(self.config, self._target(pl_module))
        self._injected = True
        if self.only_adapters:
            for name, p in pl_module.named_parameters():
                p.requires_grad_("lora_" in name)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["lora_adapter"] = {k: v.detach().cpu()
                                      for k, v in get_peft_model_state_dict(self._target(pl_module)).items()}
