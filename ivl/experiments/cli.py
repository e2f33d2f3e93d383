"""The command line: LightningCLI over the three stages and the DataModules, configs in YAML (omegaconf)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

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
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--paths", type=dict, default={},
                            help="Named paths for ${paths.X} interpolation in configs (teacher, corpora, ...)")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return IVLCLI(
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
