"""The command line: LightningCLI over the three stages and the DataModules, configs in YAML (omegaconf)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning_utilities.core.imports import RequirementCache

from ivl.cpu_threads import fit_threads_to_cpus
from ivl.cuda_allocator import expandable_segments
from ivl.data.modules import check_corpora
from ivl.errors import UsageError
from ivl.stages import StageModule
from ivl.stages.checkpoints import newest_readable, remove_leftovers, unreadable
from ivl.stages.distributed import checkpointed_blocks
from ivl.stages.models import check_student, check_teacher

# Entries whose value is None are written too, so that the saved config reproduces the run. jsonargparse 4.49
# renamed the flag skip_unset and warns on the old name; the floor of its range (4.30) knows only skip_none. (Its
# save() is wrapped by a shim whose signature hides the name: the version tells.)
KEEP_NONE = {"skip_unset" if RequirementCache("jsonargparse>=4.49") else "skip_none": False}


class SaveConfigToMLflow(SaveConfigCallback):
    """Writes the resolved config to ``<default_root_dir>/config.yaml`` and, with an MLFlowLogger, uploads that file
    as the run's ``config.yaml`` artifact: MLflow truncates each logged parameter to 250 characters. (An MLflow
    database has no log_dir for Lightning's own copy.)"""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, path, overwrite=True, multifile=False, **KEEP_NONE)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path))


class IVLCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        """Missing student or teacher folders, corpus files and a bad checkpointing mode fail here, in one line,
        before anything is built or an MLflow run is created (raised while instantiating, they would reach the user
        wrapped in a parser error)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        if model is not None and "init_args" in model:
            check_student(model.init_args.get("student"))
            check_teacher(model.init_args.get("teacher"))
            try:
                checkpointed_blocks(1, model.init_args.get("activation_checkpointing"))
            except ValueError as error:
                raise UsageError(f"model.init_args.{error}") from None
        data = config.get("data")
        if data is not None and "init_args" in data and "train" in data.init_args:
            args = data.init_args
            check_corpora(
                [dict(vars(s)) if hasattr(s, "__dict__") else s for s in args.train or []],
                [dict(vars(s)) if hasattr(s, "__dict__") else s for s in args.get("val") or []],
                args.get("missing_hint"),
                prefix="data.",
            )
        if self.subcommand == "fit" and self.resolves_checkpoints:
            config.ckpt_path = resume_from(config.get("ckpt_path"), checkpoint_folders(config))

    resolves_checkpoints = True

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--paths",
            type=dict,
            default={},
            help="Named paths for ${paths.X} interpolation in configs (teacher, corpora, ...)",
        )


class _ParseOnly(IVLCLI):
    """Parses and checks a command line as the real CLI does, and builds nothing."""

    resolves_checkpoints = False

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_only(args: list[str]) -> None:
    """Raises UsageError with the parser's own message where ``python -m ivl.experiments *args`` would stop before
    building anything (an unknown key, a value of the wrong type, a missing corpus)."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a check, not a run: its deprecation notes would repeat per child
        try:
            _cli(args, run=True, cli_class=_ParseOnly)
        except ArgumentError as error:
            raise UsageError(one_line(error)) from None


# What ivl.callbacks re-exported before it became a namespace package; configs saved by earlier runs name them.
MOVED = {
    f"ivl.callbacks.{name}": f"ivl.callbacks.{module}.{name}"
    for module, name in [
        ("duration", "RunDuration"),
        ("finite_loss", "FiniteLoss"),
        ("freezing", "LayerFreezing"),
        ("lora", "LoRAInjection"),
        ("mlflow", "MLflowTracking"),
        ("throughput", "TokenThroughput"),
    ]
}


def one_line(error: Exception) -> str:
    """jsonargparse explains a rejected value over many lines, most of them about Union alternatives that were never
    meant (a list, None, a dict of init_args): the key and the reasons that are left, in one line."""
    noise = (
        "Given value",
        "Does not validate against",
        "Subtypes",
        "Errors",
        "Expected a <class 'NoneType'>",
        "Not a valid subclass",
        "Subclass types expect",
        "a class path (str)",
        "a dict with",
        "a dict without",
    )
    lines = [line.strip().lstrip("- ").rstrip(":") for line in str(error).splitlines()]
    text = "; ".join(line for line in lines if line and not line.startswith(noise))
    moved = [f"{old} is now {new}" for old, new in MOVED.items() if f"'{old}'" in text]
    return text + (f" ({'; '.join(moved)})" if moved else "")


def checkpoint_folders(config) -> list[Path]:
    """Where the fit's checkpoints go: every ModelCheckpoint's ``dirpath``, and ``<default_root_dir>/checkpoints``
    (where CheckpointOnSignal saves without one)."""
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    folders = [
        Path(str(c.init_args.dirpath))
        for c in (callbacks if isinstance(callbacks, list) else [callbacks])
        if str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")
        and c.get("init_args")
        and c.init_args.get("dirpath")
    ]
    if trainer.get("default_root_dir"):
        folders.append(Path(str(trainer.default_root_dir)) / "checkpoints")
    return list(dict.fromkeys(folders))


def resume_from(ckpt_path: str | None, folders: list[Path]) -> str | None:
    """The checkpoint a fit resumes from. ``last``: the newest in ``folders`` that reads completely (each one skipped
    is named in a line), None when there is none yet; a path: itself, if it reads completely. What a killed write
    left in the folders is removed first (by the first process only: the others start later)."""
    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
        for folder in folders:
            for path in remove_leftovers(folder):
                print(f"ivl: removed {path}, left by a checkpoint write that was killed", flush=True)
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or not folders and ckpt_path == "last":
        return ckpt_path
    if ckpt_path == "last":
        path, skipped = newest_readable(folders)
        for where, why in skipped:
            print(f"ivl: skipping {where}: {why}", flush=True)
        if path is None and skipped:
            raise UsageError(
                f"--ckpt_path last: no checkpoint in {', '.join(map(str, folders))} reads completely "
                f"({skipped[0][0].name}: {skipped[0][1]}); leave --ckpt_path out to train from the start"
            )
        print(
            f"ivl: resuming from {path}"
            if path
            else f"ivl: no checkpoint in {', '.join(map(str, folders))} yet: training from the start",
            flush=True,
        )
        return str(path) if path else None
    path = Path(ckpt_path)
    if not path.exists():
        raise UsageError(f"--ckpt_path {path}: no such checkpoint")
    why = unreadable(path)
    if why is not None:
        newest, _ = newest_readable([path.parent])
        raise UsageError(
            f"--ckpt_path {path}: {why}"
            + (
                f"; the newest checkpoint beside it that reads completely is {newest} (--ckpt_path last takes it)"
                if newest
                else ""
            )
        )
    return ckpt_path


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    argv = sys.argv[1:] if args is None else args
    fit_threads_to_cpus()
    expandable_segments()
    try:
        return _cli(args, run)
    except UsageError as error:  # a missing folder or corpus: one line, no traceback, no run started
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as error:  # a key or value the config rejects: one line, not a 50-line usage block
        subcommand = argv[0] if argv and not argv[0].startswith("-") else ""
        print(
            f"error: {one_line(error)} (python -m ivl.experiments {subcommand} --help lists every option)".replace(
                "  ", " "
            ),
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _cli(args: list[str] | None, run: bool, cli_class: type[IVLCLI] = IVLCLI) -> LightningCLI:
    return cli_class(
        StageModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        save_config_callback=SaveConfigToMLflow,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        # checkpoint files written atomically in their own folder (a config that names its plugins names it too)
        trainer_defaults={"plugins": [{"class_path": "ivl.stages.checkpoints.AtomicCheckpointIO"}]},
        args=args,
        run=run,
    )
