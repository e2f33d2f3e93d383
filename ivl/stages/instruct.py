"""Stage II: supervised instruction tuning, loss on answer tokens only."""

from __future__ import annotations

from torchmetrics import MeanMetric

from ivl.stages.base import StageModule, answer_loss_and_accuracy


class InstructModule(StageModule):
    """SFT of the student on instruction data (labels -100 outside answers). What trains is ``trainable``
    (default: the whole language model; the vision tower stays as converted). Validation logs the loss and the
    exact-match accuracy of greedy answers, overall (``val/accuracy``) and per task (``val/accuracy/<task>``, from
    the records' "task" field or the corpus name)."""

    default_trainable = (r"lm\..*",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_accuracy = MeanMetric(nan_strategy="ignore")
        self.task_accuracy: dict[str, MeanMetric] = {}

    def training_step(self, batch: dict, batch_idx: int):
        loss, _ = answer_loss_and_accuracy(self.model, batch)
        self.log_tokens(batch, loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        loss, correct = answer_loss_and_accuracy(self.model, batch)
        n = int((~correct.isnan()).sum())
        self.val_accuracy.update(correct)
        self.log("val/loss", loss, prog_bar=True, batch_size=max(1, n))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=max(1, n))
        for task, ok in zip(batch.get("tasks", []), correct.tolist()):
            if task is not None and ok == ok:
                self.task_accuracy.setdefault(task, MeanMetric()).update(ok)

    def on_validation_epoch_end(self) -> None:
        for task, metric in self.task_accuracy.items():
            self.log(f"val/accuracy/{task}", metric.compute(), batch_size=1)
            metric.reset()
