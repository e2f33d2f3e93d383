"""Each child's fit config: the sweep's base with the child's grid values, seed, folders and MLflow run, checked
as ``fit`` would parse it before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ivl.errors import UsageError
from ivl.experiments.cli import parse_only
from ivl.experiments.spec import Child, Sweep, short


def child_config(base: DictConfig, sweep: Sweep, child: Child, folder: Path, run_id: str) -> DictConfig:
    """The base config (the sweep's overrides already applied) with the child's grid values and seed, its own
    output folders, and its MLflow logger pointed at its child run."""
    config = base.copy()
    for key, value in child.values.items():
        OmegaConf.update(config, key, value, force_add=True)
    if child.seed is not None:
        config.seed_everything = child.seed
    OmegaConf.update(config, "trainer.default_root_dir", str(folder), force_add=True)
    for callback in _callbacks(config):
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            OmegaConf.update(callback, "init_args.dirpath", str(folder / "checkpoints"), force_add=True)
            OmegaConf.update(callback, "init_args.save_last", True, force_add=True)  # what a rerun resumes from
    if OmegaConf.select(config, "model.init_args.save_dir") is not None:
        OmegaConf.update(config, "model.init_args.save_dir", str(folder / "model"))
    logger = mlflow_logger(config)
    OmegaConf.update(logger, "init_args.run_id", run_id, force_add=True)
    return config


def _callbacks(config: DictConfig) -> list:
    callbacks = OmegaConf.select(config, "trainer.callbacks")
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, ListConfig) else [callbacks]


def mlflow_logger(config: DictConfig) -> DictConfig:
    """The base config's MLFlowLogger entry (``trainer.logger``, alone or in a list)."""
    logger = OmegaConf.select(config, "trainer.logger")
    for entry in list(logger) if isinstance(logger, ListConfig) else [logger]:
        if isinstance(entry, DictConfig) and str(entry.get("class_path", "")).endswith("MLFlowLogger"):
            return entry
    raise UsageError(
        "a sweep's base config needs trainer.logger to be an MLFlowLogger (ivl.callbacks.mlflow_logger."
        "BufferedMLFlowLogger, or Lightning's) "
        "(the parent and child runs live in MLflow)"
    )


def monitored(config: DictConfig) -> tuple[str | None, str]:
    """(metric, "max" or "min") of the base config's first ModelCheckpoint that monitors one."""
    for callback in _callbacks(config):
        args = callback.get("init_args") or {}
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and args.get("monitor"):
            return str(args["monitor"]), str(args.get("mode", "min"))
    return None, "min"


def check_child(config_path: Path, extra: list[str], sweep: Sweep, child: Child) -> None:
    """Parses the child's fit command line exactly as ``fit`` would, building nothing: a key or value the config
    rejects, or a missing corpus, fails here, before any child runs."""
    try:
        parse_only([sweep.subcommand, "--config", str(config_path), *extra])
    except UsageError as err:
        message = str(err)
        values = {**sweep.overrides, **child.values}
        # the key the message names first (a value may quote another key's name, as a path of a sweep's folder)
        found = {k: m.start() for k in values if (m := re.search(rf"\b{re.escape(short(k))}\b", message))}
        named = sorted(found, key=found.get)
        where = f"key {named[0]!r} = {values[named[0]]!r}" if named else f"child {child.name!r}"
        raise UsageError(f"{sweep.file}: {where}: {message}") from None
