"""Training survives its surroundings: a real MLflow server killed mid-fit (and restarted, or not), checkpoint writes
killed at random moments with TMPDIR elsewhere, a torn last.ckpt, SIGTERM / SIGINT / SIGUSR1 mid-epoch, and
checkpoints on time."""

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import requests
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from ivl.callbacks.mlflow_logger import BufferedMLFlowLogger
from ivl.callbacks.preemption import CheckpointOnSignal
from ivl.errors import UsageError
from ivl.experiments.cli import resume_from
from ivl.stages.checkpoints import AtomicCheckpointIO, newest_readable, remove_leftovers, unreadable

ROOT = Path(__file__).parents[1]


class Logged(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out


def boring_fit(tmp_path, steps, callbacks, logger=False, **trainer):
    fit = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        **trainer,
    )
    fit.fit(Logged(), DataLoader(RandomDataset(32, 64), batch_size=2))
    return fit


class At(Callback):
    """Calls ``action(step)`` at the start of the given training steps."""

    def __init__(self, steps, action):
        self.steps, self.action = set(steps), action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.action(trainer.global_step)


# ---- a real MLflow server that goes away ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path):
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'db.sqlite'}",
                "--default-artifact-root",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    server.start()
    yield server
    try:
        server.kill()
    except ProcessLookupError:
        pass


def test_a_tracking_server_killed_mid_fit_and_restarted_gets_every_metric(tmp_path, server, capfd):
    logger = BufferedMLFlowLogger(experiment_name="gone", tracking_uri=server.uri)
    boring_fit(tmp_path, 24, [At([5], lambda s: server.kill()), At([12], lambda s: server.start())], logger=logger)
    err = capfd.readouterr().err
    assert err.count(f"the tracking server at {server.uri} does not answer") == 1
    assert err.count(f"the tracking server at {server.uri} is back") == 1
    client = MlflowClient(server.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(logger.run_id, "train/loss")] == list(range(24))


def test_a_tracking_server_that_stays_gone_costs_seconds_and_the_metrics_wait_in_a_file(tmp_path, server, capfd):
    logger = BufferedMLFlowLogger(
        experiment_name="gone", tracking_uri=server.uri, final_patience=2, local_dir=str(tmp_path / "local")
    )
    started = time.time()
    boring_fit(tmp_path, 20, [At([5], lambda s: server.kill())], logger=logger)
    assert time.time() - started < 40  # the unpatched logger waited minutes in urllib3's retries, twice
    out, err = capfd.readouterr()
    assert err.count("does not answer") == 1
    [line] = [line for line in out.splitlines() if "did not take" in line]
    unsent = tmp_path / "local" / f"mlflow-unsent-{logger.run_id}.csv"
    assert f"the metrics are in {unsent}" in line and "the run's end" in line
    rows = unsent.read_text().splitlines()
    assert rows[0] == "key,value,step,timestamp" and {r.split(",")[2] for r in rows[1:]} >= {"10", "19"}


def test_the_unreachable_server_at_the_start_stops_the_fit_at_once_in_one_line(tmp_path):
    logger = BufferedMLFlowLogger(experiment_name="never", tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(
        UsageError, match=r"does not answer; start it, or set MLFLOW_TRACKING_URI .*nothing was trained"
    ):
        boring_fit(tmp_path, 2, [], logger=logger)


# ---- checkpoints -------------------------------------------------------------------------------------------


def _writer(folder: str, ready) -> None:
    """Rewrites last.ckpt (64 MB) in a loop, as a long fit does, with TMPDIR on another folder."""
    io = AtomicCheckpointIO()
    weights = torch.randn(16 * 1024 * 1024)
    for step in range(10**6):
        io.save_checkpoint({"step": step, "weights": weights}, Path(folder) / "last.ckpt")
        ready.set()


def test_checkpoint_writes_killed_at_twenty_random_moments_always_leave_one_that_loads(tmp_path, monkeypatch):
    # TMPDIR on another filesystem where there is one (Lightning's own writes then copy into place, not rename)
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    tempfile.tempdir = None  # tempfile reads TMPDIR again
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")
    steps = []
    for _ in range(20):
        ready = fork.Event()
        writer = fork.Process(target=_writer, args=(str(folder), ready))
        writer.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        path, skipped = newest_readable([folder])
        assert path == folder / "last.ckpt" and not skipped
        steps.append(torch.load(path, weights_only=True)["step"])
        remove_leftovers(folder)
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    assert not list(elsewhere.iterdir())
    shutil.rmtree(elsewhere)
    assert max(steps) > 0  # some kills came after several rewrites, mid-write for most of them


def write(path: Path, step: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_last_takes_the_newest_checkpoint_that_reads_and_names_the_torn_ones(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    good = write(folder / "epoch=0-step=2.ckpt", 2, age=30)
    torn = folder / "last.ckpt"
    torn.write_bytes(good.read_bytes()[:1000])  # cut off, as a copy killed halfway
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "unfinished.ckpt").mkdir()  # a distributed checkpoint whose ranks never finished
    (folder / ".last.ckpt.tmp-123").write_bytes(b"partial")
    assert resume_from("last", [folder]) == str(good)
    out = capsys.readouterr().out
    assert "removed" in out and ".last.ckpt.tmp-123" in out and not (folder / ".last.ckpt.tmp-123").exists()
    assert f"skipping {torn}: truncated" in out and "empty (0 bytes)" in out and "no .metadata" in out
    assert f"resuming from {good}" in out
    with pytest.raises(
        UsageError,
        match=r"--ckpt_path .*last.ckpt: truncated .* the newest checkpoint beside it "
        r"that reads completely is .*epoch=0-step=2.ckpt",
    ):
        resume_from(str(torn), [folder])
    good.unlink()
    with pytest.raises(UsageError, match=r"no checkpoint in .*checkpoints reads completely \(.*\); leave --ckpt_path"):
        resume_from("last", [folder])
    assert resume_from("last", [tmp_path / "nothing-yet"]) is None


def test_a_distributed_checkpoint_is_whole_only_with_its_metadata_and_every_shard(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"
    dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=str(folder))
    torch.save({"epoch": 0}, folder / "meta.pt")
    assert unreadable(folder) is None
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "missing part of" in unreadable(folder)


def test_the_demo_configs_time_checkpoints_keep_the_newest_two(tmp_path):
    """The shipped callback, with its interval shortened: checkpoints come on time, between validations, and only the
    two newest stay."""
    demo = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    [args] = [c["init_args"] for c in demo["trainer"]["callbacks"] if "train_time_interval" in c.get("init_args", {})]
    args = dict(args, dirpath=str(tmp_path / "checkpoints"), train_time_interval=timedelta(seconds=0.3))
    slow = At(range(100), lambda s: time.sleep(0.05))
    boring_fit(tmp_path, 30, [ModelCheckpoint(**args), slow], limit_val_batches=0)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("latest-*.ckpt"))
    assert len(kept) == 2 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    steps = sorted(int(name.split("=")[1].split(".")[0]) for name in kept)
    assert steps[1] > steps[0] >= 10  # the newest ones, written while training went on


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_sigusr1_save_a_checkpoint_then_stop(tmp_path, signum):
    kill = At([3], lambda s: os.kill(os.getpid(), signum))
    with pytest.raises(SystemExit) as stopped:
        boring_fit(tmp_path, 20, [kill, CheckpointOnSignal()])
    assert stopped.value.code in (None, 0)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4  # the batch that was running when the signal came was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back when the fit stopped


FIT = """
seed_everything: 0
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: 6
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, every_n_train_steps: 100}}
    - class_path: ivl.callbacks.preemption.CheckpointOnSignal
model:
  class_path: ivl.stages.InstructModule
  init_args: {{teacher: tiny, window: 64, lr: 3.0e-3, warmup_ratio: 0.0, trainable: [".*"]}}
data:
  class_path: ivl.data.ImageDataModule
  init_args:
    train: [{{path: {corpus}}}]
    pack_tokens: null
    batch_size: 1
    image_max_pixels: 3136
"""


def cli_fit(root: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(FIT.format(root=root, corpus=corpus))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ivl.experiments",
            "fit",
            "--config",
            str(root / "config.yaml"),
            "--trainer.callbacks+=fsdp_run.RecordStepLosses",
            "--trainer.callbacks.path",
            str(root / "losses.jsonl"),
            *extra,
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_sigterm_mid_epoch_saves_and_the_resumed_fit_has_the_losses_of_one_never_stopped(tmp_path):
    from test_stages import corpus

    data = corpus(tmp_path / "data", n=10)  # one epoch: 10 batches; stopped at step 3, in its middle
    whole = cli_fit(tmp_path / "whole", data)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = cli_fit(
        tmp_path / "stopped", data, "--trainer.callbacks+=fsdp_run.SignalAt", "--trainer.callbacks.step=3"
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 4" in stopped.stderr + stopped.stdout
    resumed = cli_fit(tmp_path / "stopped", data, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def losses(root):
        return {r["step"]: r["loss"] for r in map(json.loads, (root / "losses.jsonl").read_text().splitlines())}

    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    assert sorted(losses(tmp_path / "stopped")) == [1, 2, 3, 4, 5, 6]
