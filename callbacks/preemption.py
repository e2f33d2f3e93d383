"""CheckpointOnSignal: a fit that is told to stop saves where it is, then exits cleanly."""

from __future__ import annotations

import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSignal(Callback):
    """SIGTERM (a service manager's stop, a cluster's preemption), SIGINT (Ctrl+C) and SIGUSR1 (a scheduler's warning
    before a time limit, e.g. SLURM's ``--signal=USR1@120``): at the end of the running training batch the fit saves
    ``last.ckpt`` in the checkpoint folder and exits cleanly, so that ``--ckpt_path last`` resumes exactly there
    (the data position is in the checkpoint). A second Ctrl+C stops at once. Under Lightning's SLURM environment with
    auto-requeue, SIGUSR1 stays Lightning's (it saves its own checkpoint and requeues the job). Every rank stops at
    the same batch: the decision is taken together."""

    def __init__(self):
        self.received: str | None = None
        self._saved = False

    def on_train_start(self, trainer, pl_module) -> None:
        # here, after Lightning has set its own handlers (its SIGTERM one would end a validation unsaved); Lightning
        # puts back the handlers it found when the fit ends
        self.received, self._saved = None, False
        signals = [signal.SIGTERM, signal.SIGINT]
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            signals.append(signal.SIGUSR1)
        for signum in signals:
            try:
                signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: Lightning's own handling stays
                pass

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name
            rank_zero_info(
                f"ivl: {self.received}: saving a checkpoint after this batch, then stopping "
                f"(Ctrl+C again stops at once)"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._saved or not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        callback = trainer.checkpoint_callback
        folder = (
            Path(callback.dirpath)
            if callback is not None and callback.dirpath
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)
        self._saved = True
        rank_zero_info(
            f"ivl: stopped by {self.received or 'a signal'} at step {trainer.global_step}; saved {path}; "
            f"resume with --ckpt_path last"
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop(trainer)

    def _stop(self, trainer) -> None:
        """After the batch that was saved has ended for every callback and logger (its metrics are logged)."""
        if self._saved:
            for logger in trainer.loggers:
                logger.interrupted = True  # an MLflow run ends as KILLED, not FAILED
            raise SIGTERMException
