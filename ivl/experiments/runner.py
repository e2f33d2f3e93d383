"""Runs (or continues) a sweep: every child a ``fit`` in its own process, one after another or several at once
on GPUs, its state kept in ``sweep.json`` so that a rerun skips finished children and resumes the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ivl.errors import UsageError
from ivl.experiments.child_configs import check_child, child_config, mlflow_logger
from ivl.experiments.spec import Child, Sweep
from ivl.experiments.summary import summarise
from ivl.experiments.tracking import Tracking

STATE = "sweep.json"


@dataclass
class Running:
    child: Child
    run_id: str
    folder: Path
    process: subprocess.Popen
    log: Any
    slot: int | None
    started: float


def _start(
    tracking: Tracking,
    child: Child,
    run_id: str,
    folder: Path,
    extra: list[str],
    gpu: int | None,
    echo: bool,
    subcommand: str = "fit",
    slot: int | None = None,
) -> Running:
    command = [sys.executable, "-m", "ivl.experiments", subcommand, "--config", str(folder / "config.yaml"), *extra]
    if subcommand == "fit" and any((folder / "checkpoints").glob("*.ckpt")):
        command += ["--ckpt_path", "last"]  # the newest checkpoint that reads completely (a torn one is skipped)
        print(f"[sweep] {child.name}: resuming from its checkpoints in {folder / 'checkpoints'}", flush=True)
    tracking.client.update_run(run_id, status="RUNNING")
    env = dict(os.environ)
    if gpu is not None:  # the gpu-th of the GPUs this process sees (CUDA_VISIBLE_DEVICES may already pick some)
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)
    log = (folder / "fit.log").open("ab")
    process = subprocess.Popen(command, stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT, env=env)
    return Running(child, run_id, folder, process, log, slot, time.time())


def _echo(running: Running) -> None:
    """Copies a sequential child's output to the console (progress bars included) and to its fit.log."""
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    for chunk in iter(lambda: running.process.stdout.read1(4096), b""):
        running.log.write(chunk)
        running.log.flush()  # fit.log is what people tail
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stdout.write(chunk.decode(errors="replace"))


def _finish(running: Running, tracking: Tracking) -> bool:
    code = running.process.wait()
    running.log.close()
    took = time.time() - running.started
    client = tracking.client
    if code == 0:
        if tracking.status(running.run_id) != "FINISHED":
            client.set_terminated(running.run_id, "FINISHED")
        print(f"[sweep] {running.child.name}: finished in {took:.0f} s", flush=True)
        return True
    tail = (running.folder / "fit.log").read_text(errors="replace").strip().splitlines()[-20:]
    client.set_tag(running.run_id, "error", "\n".join(tail)[-5000:])
    client.log_artifact(running.run_id, str(running.folder / "fit.log"))
    client.set_terminated(running.run_id, "FAILED")
    print(
        f"[sweep] {running.child.name}: FAILED (exit {code}) after {took:.0f} s; log: {running.folder / 'fit.log'}\n"
        + "\n".join(f"    {line}" for line in tail[-5:]),
        flush=True,
    )
    return False


def run(sweep_file: str, extra: list[str], parallel: int = 1, per_gpu: int = 1) -> int:
    """Runs (or continues) a sweep; returns the number of failed children.

    ``parallel`` children run at once, ``per_gpu`` of them on each GPU (for models too small to fill one: the GPU's
    idle time between one child's kernels goes to the others)."""
    sweep = Sweep.load(sweep_file)
    base = OmegaConf.load(sweep.base)
    for key, value in sweep.overrides.items():
        OmegaConf.update(base, key, value, force_add=True)
    logger = mlflow_logger(base)
    if parallel < 1 or per_gpu < 1:
        raise UsageError(f"--parallel and --per-gpu must be >= 1; got {parallel} and {per_gpu}")
    if parallel > 1:
        import torch

        gpus = -(-parallel // per_gpu)
        if torch.cuda.device_count() < gpus:
            raise UsageError(
                f"--parallel {parallel} with {per_gpu} child(ren) per GPU needs {gpus} GPUs, but "
                f"{torch.cuda.device_count()} CUDA GPUs are visible"
            )
    root = Path(str(OmegaConf.select(base, "trainer.default_root_dir") or "runs")) / "sweeps" / sweep.name
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {"parent": None, "children": {}}
    children = sweep.children()

    # Every child's config is written and checked before anything runs or any run is created.
    for child in children:
        folder = root / child.folder_name
        folder.mkdir(exist_ok=True)
        config = child_config(base, sweep, child, folder, state["children"].get(child.folder_name) or "pending")
        OmegaConf.save(config, folder / "config.yaml")
        check_child(folder / "config.yaml", extra, sweep, child)

    tracking = Tracking(logger)
    parent = tracking.parent(sweep, state.get("parent"))
    state["parent"] = parent
    print(f"[sweep] {sweep.name}: {len(children)} children, parent run {parent} in {tracking.uri}", flush=True)
    todo = []
    for child in children:
        folder = root / child.folder_name
        run_id = tracking.child(sweep, child, parent, state["children"].get(child.folder_name))
        state["children"][child.folder_name] = run_id
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        OmegaConf.save(child_config(base, sweep, child, folder, run_id), folder / "config.yaml")
        if tracking.status(run_id) == "FINISHED":
            print(f"[sweep] {child.name}: finished before, skipped", flush=True)
        else:
            todo.append((child, run_id, folder))

    failed = 0
    if parallel == 1:
        for child, run_id, folder in todo:
            print(f"[sweep] {child.name}: starting ({folder})", flush=True)
            running = _start(tracking, child, run_id, folder, extra, None, echo=True, subcommand=sweep.subcommand)
            _echo(running)
            failed += not _finish(running, tracking)
    else:
        free, active = list(range(parallel)), []  # slots; slot s runs on GPU s // per_gpu
        while todo or active:
            while todo and free:
                child, run_id, folder = todo.pop(0)
                slot = free.pop(0)
                gpu = slot // per_gpu
                print(f"[sweep] {child.name}: starting on GPU {gpu} (log: {folder / 'fit.log'})", flush=True)
                active.append(
                    _start(
                        tracking, child, run_id, folder, extra, gpu, echo=False, subcommand=sweep.subcommand, slot=slot
                    )
                )
            time.sleep(1.0)
            for running in [r for r in active if r.process.poll() is not None]:
                active.remove(running)
                free.append(running.slot)
                failed += not _finish(running, tracking)

    summarise(tracking, sweep, base, children, state["children"], parent, root)
    tracking.client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    if failed:
        tracking.client.set_tag(parent, "failed_children", str(failed))
    return failed
