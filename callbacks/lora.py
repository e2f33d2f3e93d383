"""LoRAInjection: add peft LoRA adapters to any stage's language model."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from ivl.stages import lora


class LoRAInjection(Callback):
    """Gives the stage a LoRA config in ``setup`` (before ``configure_model`` builds the student), so the stage
    injects the adapters into its language model, trains only them (``only_adapters``), and merges them on export,
    exactly as ``LongContextModule`` does. Default targets: every projection of attention, GDN and the MLPs."""

    def __init__(
        self,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        only_adapters: bool = True,
    ):
        self.config = lora.lora_config(r, alpha, dropout, target_modules)
        self.only_adapters = only_adapters

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(pl_module, "model", None) is not None:
            raise RuntimeError("LoRAInjection must set up before the stage builds its model")
        pl_module.lora_config = self.config
        if self.only_adapters:
            pl_module.trainable = list(lora.TRAINABLE)
