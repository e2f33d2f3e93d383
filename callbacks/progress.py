"""ProgressBar: Rich's bars on a terminal, plain lines where the output is a file (a log, a cluster job)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar
from rich import get_console

from ivl.stages.host_batch import count_tokens


def _number(value) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar on a terminal or in a notebook. Where the output is neither (redirected to a log
    file, a cluster job's output), a live bar draws nothing until the end, so one line is printed instead every
    ``every_n_steps`` optimizer steps or every ``every_seconds``, whichever comes first (epoch, step, the
    progress-bar metrics such as ``train/loss``, tokens/s, elapsed time), and one line after each validation."""

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 60.0, **kwargs):
        super().__init__(**kwargs)
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self._lines = False
        self._start = self._last_time = 0.0
        self._last_step = self._tokens = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        console = get_console()
        self._lines = not (console.is_terminal or console.is_jupyter)
        if self._lines:
            self.disable()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = self._last_time = time.monotonic()
        self._last_step, self._tokens = trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not (self._lines and trainer.is_global_zero):
            return
        self._tokens += count_tokens(batch)
        now, step = time.monotonic(), trainer.global_step
        if step - self._last_step < self.every_n_steps and now - self._last_time < self.every_seconds:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}", f"step {step}/{total}"]
        parts += [f"{key} {_number(value)}" for key, value in self._metrics(trainer, pl_module, "train/")]
        parts += [
            f"{self._tokens / max(now - self._last_time, 1e-9):,.0f} tokens/s",
            f"{(now - self._start) / 60:.1f} min",
        ]
        print("ivl: " + " | ".join(parts), flush=True)
        self._last_time, self._last_step, self._tokens = now, step, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._lines and trainer.is_global_zero and not trainer.sanity_checking:
            metrics = self._metrics(trainer, pl_module, "val/")
            if metrics:
                print(
                    f"ivl: validation at step {trainer.global_step} | "
                    + " | ".join(f"{key} {_number(value)}" for key, value in metrics),
                    flush=True,
                )
            self._last_time, self._tokens = time.monotonic(), 0  # tokens/s counts training time only

    def _metrics(self, trainer, pl_module, prefix: str) -> list[tuple[str, float]]:
        metrics = self.get_metrics(trainer, pl_module)
        return [
            (key, value) for key, value in metrics.items() if key.startswith(prefix) and isinstance(value, (int, float))
        ]
