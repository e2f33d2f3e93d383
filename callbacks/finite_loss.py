"""FiniteLoss: a fit whose training loss turns NaN or infinite stops there with an error, instead of training on
non-finite weights to its last step (and logging zeros to MLflow, which stores NaN as 0 with a flag)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class FiniteLoss(Callback):
    """Checks the training loss at every logging step (``trainer.log_every_n_steps``), where Lightning waits for the
    GPU to log anyway: once the weights are non-finite every later loss is too, so the check costs no extra host
    synchronisation and still stops within that many steps. Any rank's non-finite loss stops every rank."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            shape = tuple(batch["input_ids"].shape) if isinstance(batch, dict) and "input_ids" in batch else None
            raise FloatingPointError(
                f"the training loss is {loss.item() if bad else 'finite on this rank but not on another'} "
                f"at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}, input_ids "
                f"{shape}): the fit stops, its weights are no longer finite. Resume from a checkpoint saved before "
                f"this step (lower the learning rate, or check precision), or rerun with "
                f"--trainer.log_every_n_steps 1 to find the first such step."
            )
