"""The command line: LightningCLI over the three stages and the DataModules, configs in YAML (omegaconf)."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from ivl.data.modules import check_corpora
from ivl.cpu_threads import fit_threads_to_cpus
from ivl.cuda_allocator import expandable_segments
from ivl.errors import UsageError
from ivl.experiments.moved import accept_moved_class_paths
from ivl.stages.distributed import checkpointed_blocks
from ivl.stages.models import check_student, check_teacher
from ivl.stages import StageModule


class SaveConfigToMLflow(SaveConfigCallback):
    """Writes the resolved config to ``<default_root_dir>/config.yaml`` and, with an MLFlowLogger, uploads it as
    the run's ``config.yaml`` artifact: MLflow truncates each logged parameter to 250 characters. (An MLflow
    database has no log_dir for Lightning's own copy.)"""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, Path(trainer.default_root_dir) / "config.yaml", skip_none=False,
                             overwrite=True, multifile=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "config.yaml"
                    self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
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
            check_corpora([dict(vars(s)) if hasattr(s, "__dict__") else s for s in args.train or []],
                          [dict(vars(s)) if hasattr(s, "__dict__") else s for s in args.get("val") or []],
                          args.get("missing_hint"), prefix="data.")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--paths", type=dict, default={},
                            help="Named paths for ${paths.X} interpolation in configs (teacher, corpora, ...)")


class _ParseOnly(IVLCLI):
    """Parses and checks a command line as the real CLI does, and builds nothing."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_only(args: list[str]) -> None:
    """Raises UsageError with the parser's own message where ``python -m ivl.experiments *args`` would stop before
    building anything (an unknown key, a value of the wrong type, a missing corpus)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a check, not a run: its deprecation notes would repeat per child
            _cli(args, run=True, cli_class=_ParseOnly)
    except SystemExit:
        text = stderr.getvalue()
        message = text[text.rfind("error: ") + len("error: "):] if "error: " in text else text
        # jsonargparse explains a rejected value over many lines, most of them about Union alternatives that
        # were never meant (None); one line of what is left reads as a path to the offending key.
        noise = ("Given value", "Does not validate against", "Subtypes", "Errors", "Expected a <class 'NoneType'>")
        lines = [line.strip().lstrip("- ").rstrip(":") for line in message.strip().splitlines()]
        raise UsageError("; ".join(line for line in lines if line and not line.startswith(noise))) from None


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    argv = sys.argv[1:] if args is None else args
    fit_threads_to_cpus()
    expandable_segments()
    if argv[:1] == ["sweep"]:
        from ivl.experiments.sweep import main as sweep

        raise SystemExit(sweep(argv[1:]))
    try:
        return _cli(args, run)
    except UsageError as error:  # a missing folder or corpus: one line, no traceback, no run started
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _cli(args: list[str] | None, run: bool, cli_class: type[IVLCLI] = IVLCLI) -> LightningCLI:
    accept_moved_class_paths()
    return cli_class(
        StageModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=SaveConfigToMLflow,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        args=args,
        run=run,
    )
