"""Callbacks for the multi-process CLI runs of tests/test_fsdp_cli.py (imported by the spawned processes)."""

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class RecordStepLosses(Callback):
    """Appends {"step": n, "loss": mean over the step's micro-batches and all processes} to a JSON-lines file."""

    def __init__(self, path: str):
        self.path, self.micro = Path(path), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.micro.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)  # Lightning divides by it
        if len(self.micro) < trainer.accumulate_grad_batches:
            return
        loss = trainer.strategy.reduce(
            torch.tensor(sum(self.micro) / len(self.micro), device=pl_module.device), reduce_op="mean"
        )
        self.micro = []
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")


class KillAt(Callback):
    """SIGKILLs every process when step ``step`` is about to start (the previous step's checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.strategy.barrier()
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(Callback):
    """Sends the signal ``name`` (SIGTERM) to this process when step ``step`` is about to start."""

    def __init__(self, step: int, name: str = "SIGTERM"):
        self.step, self.name = step, name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.name))
