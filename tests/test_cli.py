"""python -m ivl.experiments: every shipped config parses; a real fit records a real MLflow run."""

from pathlib import Path

import mlflow
import pytest

from ivl.data.demo import build
from ivl.experiments.cli import main

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


@pytest.mark.parametrize("config", sorted(p.name for p in EXPERIMENTS.glob("*.yaml")))
def test_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(EXPERIMENTS / config), "--print_config"])
    assert exit.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: ivl.stages." in printed and "${" not in printed  # interpolations resolved


def test_demo_fit_records_an_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo config's relative paths (data/demo, runs/) land here
    build(tmp_path / "data" / "demo", seed=0, scale=0.01)
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # wins over the config's default store
    main(["fit", "--config", str(EXPERIMENTS / "demo.yaml"), "--trainer.max_steps", "4",
          "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("ivl-demo").experiment_id])
    assert run.data.params["lr"] == "0.003" and run.data.params["teacher"] == "tiny"
    assert run.data.tags["stage"] == "InstructModule" and run.data.tags["hybrid_ratio"] == "0.25"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 4 and all(m.value > 0 for m in losses)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "model"} <= artifacts
    assert (tmp_path / "runs" / "demo" / "model" / "config.json").exists()
