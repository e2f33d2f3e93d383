"""RunDuration: how long the fit will take, printed once a few training batches have been timed."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class RunDuration(Callback):
    """After ``after_batches`` training batches, prints the expected duration of the whole fit on this machine
    (training batches left x the measured seconds per batch; validation and start-up come on top), and at the
    end the time it took."""

    def __init__(self, after_batches: int = 20):
        self.after_batches = after_batches
        self._start = self._first = None
        self._seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._first is None:
            self._first = time.perf_counter()  # the first batch's wait for workers is not typical

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._seen != self.after_batches + 1:
            return
        per_batch = (time.perf_counter() - self._first) / self.after_batches
        total = trainer.estimated_stepping_batches * trainer.accumulate_grad_batches
        left = max(0, total - self._seen) * per_batch
        rank_zero_info(
            f"ivl: {per_batch:.2f} s per training batch here; about {left / 60:.1f} min of training left "
            f"({total} batches in all, validation not counted)"
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            rank_zero_info(f"ivl: training took {(time.perf_counter() - self._start) / 60:.1f} min")
