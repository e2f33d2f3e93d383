"""`python -m ivl.experiments sweep`: children as nested MLflow runs of one parent, a summary, failures that do
not stop the sweep, reruns that skip finished children and resume killed ones, bad sweep files refused early."""

import csv
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_stages import corpus

from ivl.experiments.sweep import main as sweep

TESTS = Path(__file__).parent

BASE = """
seed_everything: 0
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: 3
  val_check_interval: 1
  limit_val_batches: 1
  check_val_every_n_epoch: null
  default_root_dir: {root}/runs/tiny
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  logger:
    class_path: lightning.pytorch.loggers.MLFlowLogger
    init_args: {{experiment_name: tiny, tracking_uri: "sqlite:///{root}/mlflow.db"}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/runs/tiny/checkpoints, every_n_train_steps: 1, monitor: val/accuracy, mode: max}}
model:
  class_path: ivl.stages.InstructModule
  init_args: {{teacher: tiny, window: 64, lr: 3.0e-3, warmup_ratio: 0.0, trainable: [".*"]}}
data:
  class_path: ivl.data.ImageDataModule
  init_args:
    train: [{{path: {corpus}}}]
    val: [{{path: {corpus}, name: colors}}]   # per-task accuracy: val/accuracy/colors
    pack_tokens: null
    batch_size: 2
    image_max_pixels: 3136
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "base.yaml").write_text(BASE.format(root=tmp_path, corpus=corpus(data, n=4)))
    return tmp_path


def write_sweep(folder: Path, body: str) -> str:
    path = folder / "sweep.yaml"
    path.write_text(body)
    return str(path)


def runs(root: Path):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    return client, client.search_runs([experiment.experiment_id])


def test_sweep_nests_children_under_one_parent_survives_a_kill_and_skips_finished_children(workdir, capfd):
    file = write_sweep(workdir, "name: windows\nbase: base.yaml\ngrid:\n  model.init_args.window: [32, 64]\n")
    killed = ["--trainer.callbacks+=fsdp_run.KillAt", "--trainer.callbacks.step=1"]

    # 1. every child is killed after its first step: both are marked failed, and the sweep still ends
    assert sweep(["--config", file, *killed]) == 1  # exit status 1: some children failed
    client, all_runs = runs(workdir)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_name == "windows" and parent.info.status == "FAILED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FAILED" and c.data.tags["error"] for c in children)
    assert sorted(c.data.params["model.init_args.window"] for c in children) == ["32", "64"]
    folder = workdir / "runs" / "tiny" / "sweeps" / "windows"
    assert all((folder / name / "checkpoints" / "last.ckpt").exists() for name in ("00-window=32", "01-window=64"))

    # 2. rerun: the same parent and child runs; each child resumes from its last checkpoint and finishes
    capfd.readouterr()
    assert sweep(["--config", file]) == 0
    out = capfd.readouterr().out
    assert out.count("resuming from its checkpoints") == 2
    assert out.count("ivl: resuming from ") == 2  # each child took its newest readable checkpoint
    client, all_runs = runs(workdir)
    assert len(all_runs) == 3
    by_id = {r.info.run_id: r for r in all_runs}
    assert by_id[parent.info.run_id].info.status == "FINISHED"
    for child in children:
        run = by_id[child.info.run_id]
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
        assert max(steps) >= 2  # trained past the step it was killed at
        assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]  # a complete fit's run

    # the summary: one row per child with its grid value and the monitored metric, in the parent's artifacts
    with (folder / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["window"] for r in rows] == ["32", "64"] and all(r["status"] == "FINISHED" for r in rows)
    assert all(0.0 <= float(r["val/accuracy (best)"]) <= 1.0 for r in rows)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert {"summary.csv", "summary.md", "summary.png", "summary_tasks.png", "sweep.yaml", "base.yaml"} <= set(
        artifacts
    )
    assert all(0.0 <= float(r["val/accuracy/colors"]) <= 1.0 for r in rows)  # per-task columns too

    # 3. rerun once more: nothing left to do
    assert sweep(["--config", file]) == 0
    assert capfd.readouterr().out.count("finished before, skipped") == 2
    assert len(runs(workdir)[1]) == 3


@pytest.mark.parametrize(
    "body, named",
    [
        ("base: base.yaml\ngrid:\n  model.init_args.window: [32]\nsteps: 3\n", "unknown field 'steps'"),
        ("base: base.yaml\ngrid: {}\n", "`grid:`"),
        ("base: base.yaml\ngrid:\n  model.init_args.window: []\n", "'model.init_args.window'"),
        ("base: base.yaml\ngrid:\n  model.init_args.hybrid_ratoi: [0.5]\n", "key 'model.init_args.hybrid_ratoi'"),
        ("base: base.yaml\ngrid:\n  model.init_args.window: [32, abc]\n", "key 'model.init_args.window'"),
        ("base: missing.yaml\ngrid:\n  model.init_args.window: [32]\n", "base config 'missing.yaml' not found"),
        # a missing student whose path names another swept key: the message is about the student
        (
            "base: base.yaml\ngrid:\n  model.init_args.student: [runs/02-window=32/model]\noverrides:\n"
            "  model.init_args.window: 32\n",
            "key 'model.init_args.student' = 'runs/02-window=32/model'",
        ),
    ],
)
def test_bad_sweep_files_fail_before_any_run_naming_the_key(workdir, capfd, body, named):
    assert sweep(["--config", write_sweep(workdir, body)]) == 2
    err = capfd.readouterr().err
    assert named in err and "sweep.yaml" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert not (workdir / "mlflow.db").exists()  # no parent run was created


EXPERIMENTS = TESTS.parent / "experiments"
SWEEP_FILES = sorted(str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.yaml") if "\ngrid:" in p.read_text())


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_shipped_sweep_files_give_children_that_their_subcommand_accepts(tmp_path, monkeypatch, name):
    from omegaconf import OmegaConf

    from ivl.data import passkey, python_docs
    from ivl.data.demo import build
    from ivl.data.processing import bundled_tokenizer_dir
    from ivl.experiments.child_configs import check_child, child_config
    from ivl.experiments.spec import Sweep

    monkeypatch.chdir(tmp_path)  # the configs' relative paths: corpora and the teacher folder are made here
    build(tmp_path / "data" / "demo", seed=0, scale=0.01)
    python_docs.build(tmp_path / "data" / "python-docs", docstrings=False)
    passkey.build(tmp_path / "data" / "passkey", str(bundled_tokenizer_dir()), window=8, train=2, per_distance=1)
    (tmp_path / "teachers" / "smollm2").mkdir(parents=True)
    (tmp_path / "teachers" / "smollm2" / "config.json").write_text("{}")  # only its presence is checked here
    spec = Sweep.load(EXPERIMENTS / name)
    base = OmegaConf.load(spec.base)
    assert spec.children()
    for child in spec.children():
        config = child_config(base, spec, child, tmp_path / child.folder_name, "run-id")
        OmegaConf.save(config, tmp_path / "child.yaml")
        student = OmegaConf.select(config, "model.init_args.student")
        if student:  # another sweep's export (passkey_sweep.yaml's Stage I students): only its presence is checked
            (tmp_path / student).mkdir(parents=True, exist_ok=True)
            (tmp_path / student / "config.json").write_text("{}")
        check_child(tmp_path / "child.yaml", [], spec, child)  # raises UsageError naming what fit would reject
        assert OmegaConf.select(config, "trainer.default_root_dir") == str(tmp_path / child.folder_name)


def test_parallel_children_need_that_many_gpus(workdir, capfd):
    file = write_sweep(workdir, "base: base.yaml\ngrid:\n  model.init_args.window: [32, 64]\n")
    assert sweep(["--config", file, "--parallel", "2"]) == 2
    assert "--parallel 2 with 1 child(ren) per GPU needs 2 GPUs, but 0 CUDA GPUs are visible" in capfd.readouterr().err
    assert sweep(["--config", file, "--parallel", "3", "--per-gpu", "2"]) == 2
    assert "needs 2 GPUs" in capfd.readouterr().err


def test_a_seeded_child_runs_beside_the_modules_own_seed_hyperparameter(workdir):
    # InstructModule logs its conversion `seed` (0) as a hyperparameter; the sweep's seed must not collide with it
    file = write_sweep(workdir, "base: base.yaml\ngrid:\n  model.init_args.window: [32]\nseeds: [1]\n")
    assert sweep(["--config", file, "--trainer.max_steps=1"]) == 0
    _, all_runs = runs(workdir)
    (child,) = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    assert child.data.params["seed_everything"] == "1" and child.data.tags["seed"] == "1"


def test_children_sharing_one_gpu_run_at_the_same_time(workdir, capfd, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the children themselves train on the CPU
    file = write_sweep(workdir, "base: base.yaml\ngrid:\n  model.init_args.window: [32, 64]\n")
    assert sweep(["--config", file, "--parallel", "2", "--per-gpu", "2", "--trainer.max_steps=1"]) == 0
    events = [line.split(": ")[1] for line in capfd.readouterr().out.splitlines() if line.startswith("[sweep] window=")]
    assert [event[:8] for event in events] == ["starting", "starting", "finished", "finished"]  # both at once
    assert events[0].startswith("starting on GPU 0") and events[1].startswith("starting on GPU 0")
    _, all_runs = runs(workdir)
    assert [r.info.status for r in all_runs if "mlflow.parentRunId" in r.data.tags] == ["FINISHED", "FINISHED"]


def test_children_cover_the_grid_for_one_seed_before_the_next():
    from ivl.experiments.spec import Sweep

    spec = Sweep(
        file=Path("s.yaml"),
        name="s",
        base=Path("b.yaml"),
        grid={"a.x": [1, 2], "a.y": ["p", "q"]},
        seeds=[0, 1],
        overrides={},
    )
    assert [(c.values["a.x"], c.values["a.y"], c.seed) for c in spec.children()] == [
        (1, "p", 0),
        (1, "q", 0),
        (2, "p", 0),
        (2, "q", 0),
        (1, "p", 1),
        (1, "q", 1),
        (2, "p", 1),
        (2, "q", 1),
    ]
    assert [c.folder_name for c in spec.children()][:2] == ["00-x=1,y=p,seed=0", "01-x=1,y=q,seed=0"]


def test_plot_labels_cut_swept_paths_to_the_parts_that_tell_them_apart():
    from ivl.experiments.plots import tick_labels

    students = ["runs/sweeps/ratios/02-ratio=0.25/model", "runs/sweeps/ratios/00-ratio=0.0/model", None]
    assert tick_labels(students) == ["…/02-ratio=0.25/model", "…/00-ratio=0.0/model", "None"]
    folders = ["runs/science/one/student_x", "runs/science/two/student_y"]
    assert tick_labels(folders) == ["…/student_x", "…/student_y"]
    same_end = ["runs/science/sweeps/first/model", "runs/science/sweeps/other/model"]
    assert tick_labels(same_end) == ["…/first/model", "…/other/model"]
    assert tick_labels(["1/4", "1/2"]) == ["1/4", "1/2"]  # short: not a path to cut
    assert tick_labels([0.0, 0.25]) == ["0.0", "0.25"]
