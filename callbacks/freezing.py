"""LayerFreezing: freeze modules by name pattern or type before training, unfreeze them on a schedule."""

from __future__ import annotations

import re

from lightning.pytorch.callbacks import BaseFinetuning


class LayerFreezing(BaseFinetuning):
    """Args:
    patterns: regexes over module names (``model.visual``, ``model.lm.layers.(0|4)``...) to freeze.
    module_types: class names to freeze (``SlidingWindowAttention``, ``Qwen2_5_VisionTransformerPretrainedModel``).
    unfreeze_at_epoch: {epoch: [patterns]}: from that epoch these modules train again (added to the optimiser
        as a new parameter group with lr x ``lr_factor``).
    """

    def __init__(
        self,
        patterns: list[str] | None = None,
        module_types: list[str] | None = None,
        unfreeze_at_epoch: dict[int, list[str]] | None = None,
        lr_factor: float = 1.0,
    ):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns or []]
        self.module_types = set(module_types or [])
        self.unfreeze_at_epoch = {int(k): [re.compile(p) for p in v] for k, v in (unfreeze_at_epoch or {}).items()}
        self.lr_factor = lr_factor

    def _matching(self, pl_module, patterns, types=()):
        return [
            m
            for name, m in pl_module.named_modules()
            if name and (any(p.fullmatch(name) for p in patterns) or type(m).__name__ in types)
        ]

    def freeze_before_training(self, pl_module) -> None:
        if getattr(pl_module, "model", True) is None:  # an ivl stage builds its student later: freeze it then
            pl_module.build_hooks.append(self._freeze)
            return
        self._freeze(pl_module)

    def _freeze(self, pl_module) -> None:
        modules = self._matching(pl_module, self.patterns, self.module_types)
        if (self.patterns or self.module_types) and not modules:
            raise ValueError(
                f"LayerFreezing: no module matches patterns {[p.pattern for p in self.patterns]} or "
                f"types {sorted(self.module_types)}"
            )
        self.freeze(modules, train_bn=False)
        if hasattr(pl_module, "thawed_later"):  # an ivl stage keeps these in float32 (``store_frozen_in``)
            for patterns in self.unfreeze_at_epoch.values():
                pl_module.thawed_later.extend(p for m in self._matching(pl_module, patterns) for p in m.parameters())

    def finetune_function(self, pl_module, current_epoch: int, optimizer) -> None:
        patterns = self.unfreeze_at_epoch.get(current_epoch)
        if patterns:
            lr = optimizer.param_groups[0]["lr"] * self.lr_factor
            self.unfreeze_and_add_param_group(
                self._matching(pl_module, patterns), optimizer, lr=lr, initial_denom_lr=1.0
            )
            self._extend_schedulers(pl_module.trainer, optimizer)

    @staticmethod
    def _extend_schedulers(trainer, optimizer) -> None:
        """A scheduler built before the new parameter group keeps one base lr (and lambda) per old group; give
        the new group the same schedule as the first."""
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            while len(scheduler.base_lrs) < len(optimizer.param_groups):
                group = optimizer.param_groups[len(scheduler.base_lrs)]
                group.setdefault("initial_lr", group["lr"])
                scheduler.base_lrs.append(group["initial_lr"])
                if hasattr(scheduler, "lr_lambdas"):
                    scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
