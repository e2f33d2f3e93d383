"""Stage II: supervised instruction tuning, loss on answer tokens only."""

from __future__ import annotations

from torchmetrics import MeanMetric

from ivl.stages.base import StageModule
from ivl.stages.task_accuracy import TaskAccuracy


class InstructModule(StageModule):
    """SFT of the student on instruction data (labels -100 outside answers). What trains is ``trainable``
    (default: the whole language model; the vision tower stays as converted). Validation logs the loss and the
    exact-match accuracy of greedy answers, overall (``val/accuracy``) and per task (``val/accuracy/<task>``, from
    the records' "task" field or the corpus name)."""

    default_trainable = (r"lm\..*",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_accuracy = MeanMetric(nan_strategy="ignore")
        self.task_accuracy = TaskAccuracy()

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.answer_losses(batch).ce
        self.log_tokens(batch, loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.answer_losses(batch)
        n = int((~out.correct.isnan()).sum())
        self.val_accuracy.update(out.correct)
        self.log("val/loss", out.ce, prog_bar=True, batch_size=max(1, n))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=max(1, n))
        self.task_accuracy.update(batch.get("tasks", []), out.correct)

    def on_validation_epoch_end(self) -> None:
        for task, accuracy in self.task_accuracy.compute(self.device).items():
            self.log(f"val/accuracy/{task}", accuracy, batch_size=1)
        self.task_accuracy.reset()
