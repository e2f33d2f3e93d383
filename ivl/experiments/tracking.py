"""The sweep's MLflow side: its experiment, one parent run per sweep and a child run per grid point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ivl.experiments.spec import Child, Sweep


class Tracking:
    """The sweep's MLflow experiment, parent run and child runs, through MLflow's client."""

    def __init__(self, logger: DictConfig):
        from mlflow.tracking import MlflowClient

        args = OmegaConf.to_container(logger.get("init_args") or OmegaConf.create({}), resolve=True)
        uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLFlowLogger's own default
            uri = f"file:{Path(args.get('save_dir') or './mlruns').resolve()}"
        self.uri = uri
        self.client = MlflowClient(uri)
        name = args.get("experiment_name") or "lightning_logs"
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)

    def run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def parent(self, sweep: Sweep, run_id: str | None) -> str:
        if self.run_exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=sweep.name, tags={"ivl.sweep": sweep.name, "ivl.sweep_file": str(sweep.file)}
        )
        run_id = run.info.run_id
        for key, values in sweep.grid.items():
            self.client.log_param(run_id, f"grid/{key}", json.dumps(values))
        if sweep.seeds:
            self.client.log_param(run_id, "seeds", json.dumps(sweep.seeds))
        for key, value in sweep.overrides.items():
            self.client.log_param(run_id, f"overrides/{key}", json.dumps(value))
        self.client.log_param(run_id, "base", str(sweep.base))
        self.client.log_artifact(run_id, str(sweep.file))
        self.client.log_artifact(run_id, str(sweep.base))
        return run_id

    def child(self, sweep: Sweep, child: Child, parent: str, run_id: str | None) -> str:
        if self.run_exists(run_id):
            return run_id
        tags = {
            "mlflow.parentRunId": parent,
            "ivl.sweep": sweep.name,
            **{k: json.dumps(v) for k, v in child.values.items()},
        }
        if child.seed is not None:
            tags["seed"] = str(child.seed)
        run_id = self.client.create_run(self.experiment_id, run_name=child.name, tags=tags).info.run_id
        self.client.update_run(run_id, status="SCHEDULED")  # RUNNING once its fit starts
        for key, value in child.values.items():
            self.client.log_param(run_id, key, json.dumps(value))
        if child.seed is not None:  # named as the config key it sets: a module may log its own `seed` hparam
            self.client.log_param(run_id, "seed_everything", child.seed)
        return run_id

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status
