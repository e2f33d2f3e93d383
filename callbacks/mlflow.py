"""MLflowTracking: what an MLflow run of a stage should say about itself, next to Lightning's MLFlowLogger."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from packaging.requirements import Requirement
from packaging.version import Version

from ivl.callbacks.mlflow_logger import BufferedMLFlowLogger

PACKAGES = ("ivl", "torch", "lightning", "transformers", "peft", "flash-linear-attention", "fla-core", "mlflow")


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except Exception:
        return None


LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"


def lock_tags(lock: Path = LOCK) -> dict[str, str]:
    """``lock``: which lock file the environment was installed through (its sha256), and ``lock_differs``: the
    installed packages whose version is not the locked one ("none" when the environment is the lock's). Outside a
    checkout (installed from a wheel) there is no lock to name."""
    if not lock.is_file():
        return {"lock": "none (not run from a checkout)"}
    text = lock.read_text()
    differs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = Version(importlib.metadata.version(requirement.name))
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra that is not installed here
        if not requirement.specifier.contains(installed.public, prereleases=True):  # 2.13.0+cpu is 2.13.0
            differs.append(f"{requirement.name} {installed} (locked {requirement.specifier})")
    return {
        "lock": f"{lock.name} sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}",
        "lock_differs": ", ".join(differs)[:5000] or "none",
    }


class MLflowTracking(Callback):
    """Tags the run (stage, hybrid ratio, mixers, git commit, the dependency lock it ran on), records package
    versions, and uploads the
    checkpoints and the exported model as artifacts when training ends. Needs an MLFlowLogger on the Trainer."""

    def __init__(self, log_checkpoints: bool = True):
        self.log_checkpoints = log_checkpoints

    @staticmethod
    def _logger(trainer) -> MLFlowLogger:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                return logger
        raise ValueError("MLflowTracking needs lightning.pytorch.loggers.MLFlowLogger among the Trainer's loggers")

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        logger = self._logger(trainer)
        if isinstance(logger, BufferedMLFlowLogger):  # where it says the unlogged metrics and the checkpoints are
            logger.local_dir = logger.local_dir or trainer.default_root_dir
            if trainer.checkpoint_callback is not None:
                logger.checkpoint_dir = trainer.checkpoint_callback.dirpath
        client, run = logger.experiment, logger.run_id
        text = pl_module.model.config.text
        tags = {
            "stage": type(pl_module).__name__,
            "hybrid_ratio": f"{text.hybrid_ratio:g}",
            "mixers": ",".join(sorted(set(text.layer_types))),
            "window": str(text.window),
            "git_commit": _git_commit() or "unknown",
            **lock_tags(),
        }
        for key, value in tags.items():
            client.set_tag(run, key, value)
        versions = {}
        for package in PACKAGES:
            try:
                versions[f"version/{package}"] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        counts = pl_module.model.num_parameters()
        versions.update({f"params/{k}": v for k, v in counts.items()})
        versions["params/trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        logger.log_hyperparams(versions)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:  # after the stage's on_train_end has exported the model
        if not self.log_checkpoints:
            return
        logger = self._logger(trainer)
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            folder = Path(trainer.checkpoint_callback.dirpath)
            if folder.exists():
                logger.experiment.log_artifacts(logger.run_id, str(folder), "checkpoints")
        save_dir = getattr(pl_module.hparams, "save_dir", None)
        if save_dir and Path(save_dir).exists():
            logger.experiment.log_artifacts(logger.run_id, save_dir, "model")
