"""python -m ivl.experiments: every shipped config parses; a real fit records a real MLflow run."""

from pathlib import Path

import mlflow
import pytest

from ivl.data.demo import build
from ivl.experiments.cli import main

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


FIT_CONFIGS = sorted(
    str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.yaml") if "\ngrid:" not in p.read_text()
)  # sweep files have a grid


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(EXPERIMENTS / config), "--print_config"])
    assert exit.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: ivl.stages." in printed and "${" not in printed  # interpolations resolved


def test_a_config_naming_callbacks_where_they_were_is_one_line_naming_where_they_are(tmp_path, capsys):
    """Configs saved before ivl.callbacks became a namespace package name ivl.callbacks.TokenThroughput."""
    old = (
        (EXPERIMENTS / "demo.yaml")
        .read_text()
        .replace("ivl.callbacks.throughput.TokenThroughput", "ivl.callbacks.TokenThroughput")
    )
    (tmp_path / "old.yaml").write_text(old)
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(tmp_path / "old.yaml")])
    assert exit.value.code == 2
    line = _one_error_line(capsys)
    assert "trainer.callbacks" in line and "--help" in line
    assert "ivl.callbacks.TokenThroughput is now ivl.callbacks.throughput.TokenThroughput" in line


def test_an_unknown_key_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(EXPERIMENTS / "demo.yaml"), "--model.init_args.hybrid_ratoi", "0.5"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "hybrid_ratoi" in err, err


def test_demo_fit_records_an_mlflow_run(tmp_path, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)  # the demo config's relative paths (data/demo, runs/) land here
    build(tmp_path / "data" / "demo", seed=0, scale=0.01)
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # wins over the config's default store
    main(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "demo.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_val_batches",
            "2",
        ]
    )
    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("ivl-demo").experiment_id])
    assert run.data.params["lr"] == "0.003" and run.data.params["teacher"] == "tiny"
    assert run.data.tags["stage"] == "InstructModule" and run.data.tags["hybrid_ratio"] == "0.25"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 4 and all(m.value > 0 for m in losses)
    # nothing wired where Lightning, jsonargparse or transformers do not look for it
    ours = ("batch_transfer", "flops_per_batch", "past_key_values")  # skip_none: ours; Lightning's own call may warn
    odd = [
        f"{w.filename}: {w.message}"
        for w in recwarn
        if any(s in str(w.message) for s in ours) or "skip_none" in str(w.message) and "/ivl/" in w.filename
    ]
    assert not odd, odd
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "model"} <= artifacts
    assert (tmp_path / "runs" / "demo" / "model" / "config.json").exists()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error:" in line]
    return line


def test_missing_demo_corpus_is_one_line_that_names_the_fix_and_starts_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/demo here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'tracking.db'}")
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(EXPERIMENTS / "demo.yaml")])
    assert exit.value.code == 2
    line = _one_error_line(capsys)
    assert "data.train[0].path" in line and "python -m ivl.data.demo --out data/demo" in line
    assert not (tmp_path / "tracking.db").exists() and not (tmp_path / "runs").exists()


def test_missing_teacher_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(EXPERIMENTS / "stage1_distill.yaml")])
    assert exit.value.code == 2
    assert "teacher '/models/Qwen2.5-VL-3B-Instruct'" in _one_error_line(capsys)


@pytest.mark.parametrize("mode", ["1.5", "everything"])
def test_bad_checkpointing_mode_is_one_line(mode, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(EXPERIMENTS / "demo.yaml"), "--model.init_args.activation_checkpointing", mode])
    assert exit.value.code == 2
    assert "model.init_args.activation_checkpointing must be one of" in _one_error_line(capsys)


def test_convert_without_a_teacher_folder_is_a_usage_error(tmp_path, capsys):
    from ivl.convert import main as convert

    with pytest.raises(SystemExit) as exit:
        convert(["--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert "--teacher" in _one_error_line(capsys) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, printed", [("0.75", "0.75"), ("4", "4"), ("mixers", "mixers")])
def test_checkpointing_mode_keeps_its_type_through_the_cli(value, printed, capsys):
    """A share of the blocks stays a float and a stride an int (a string "4" would be refused as a mode)."""
    with pytest.raises(SystemExit) as exit:
        main(
            [
                "fit",
                "--config",
                str(EXPERIMENTS / "stage2_instruct.yaml"),
                "--print_config",
                "--model.init_args.activation_checkpointing",
                value,
            ]
        )
    assert exit.value.code == 0
    assert f"activation_checkpointing: {printed}\n" in capsys.readouterr().out
