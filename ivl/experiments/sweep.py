"""``python -m ivl.experiments sweep --config SWEEP.yaml [--key=value ...]``: a grid of fits as MLflow child runs.

A sweep file::

    name: hybrid-ratio                     # optional; default: the file's name without .yaml
    base: demo.yaml                        # a fit config, relative to this file or to the working directory
    grid:                                  # dotted config keys -> lists of values; several keys: every combination
      model.init_args.hybrid_ratio: [0.0, 0.25, 0.5, 1.0]
    seeds: [0, 1]                          # optional: each grid point once per seed (seed_everything)
    overrides:                             # optional: dotted keys -> one value, for every child
      trainer.max_epochs: 2
    subcommand: fit                        # optional: fit (default), validate or test

Every child is a complete ``fit`` in its own process (a failure or an out-of-memory error stays in that child),
with its own folder ``<base default_root_dir>/sweeps/<name>/<NN-child>`` holding its config, log, checkpoints and
exported model, and its own MLflow run nested under one parent run per sweep. Arguments after the sweep file apply
to every child as they would to ``fit``. Rerun with the same file, a sweep reuses its parent run, skips finished
children and resumes an unfinished one from its newest checkpoint that reads completely. At the end the parent gets the summary: a table of
each child's grid values and metrics (``summary.csv``, ``summary.md``) and a plot of the monitored metric against
each swept key (``summary.png``, seeds as error bars).

Hand-written because no kept library does this over LightningCLI configs with MLflow nesting: Lightning's own
sweeps live in its cloud product, and Optuna or Ray Tune would own the loop and the process model.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ivl.errors import UsageError

FIELDS = ("name", "base", "grid", "seeds", "overrides", "subcommand")
SUBCOMMANDS = ("fit", "validate", "test")
STATE = "sweep.json"


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    file: Path
    name: str
    base: Path
    grid: dict[str, list]
    seeds: list[int] | None
    overrides: dict[str, Any]
    subcommand: str = "fit"

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"sweep file {file} does not exist")
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{file}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{file}: a sweep file is a mapping with the fields {', '.join(FIELDS)}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise UsageError(f"{file}: unknown field {unknown[0]!r} (a sweep file has {', '.join(FIELDS)})")
        if not data.get("base"):
            raise UsageError(f"{file}: `base:` (the fit config every child starts from) is missing")
        grid = data.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise UsageError(f"{file}: `grid:` must map dotted config keys to lists of values; it is empty")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UsageError(f"{file}: grid key {key!r} must have a non-empty list of values; got {values!r}")
            if len(set(map(json.dumps, values))) != len(values):
                raise UsageError(f"{file}: grid key {key!r} repeats a value: {values}")
        seeds = data.get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or not seeds
                                  or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise UsageError(f"{file}: `seeds:` must be a non-empty list of integers; got {seeds!r}")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise UsageError(f"{file}: `overrides:` must map dotted config keys to values; got {overrides!r}")
        subcommand = data.get("subcommand", "fit")
        if subcommand not in SUBCOMMANDS:
            raise UsageError(f"{file}: `subcommand:` must be one of {', '.join(SUBCOMMANDS)}; got {subcommand!r}")
        both = sorted(set(grid) & set(overrides))
        if both:
            raise UsageError(f"{file}: key {both[0]!r} is both in `grid:` and in `overrides:`")
        return cls(file=file, name=str(data.get("name") or file.stem), base=_find_base(file, str(data["base"])),
                   grid=grid, seeds=seeds, overrides=overrides, subcommand=subcommand)

    def children(self) -> list["Child"]:
        keys = list(self.grid)
        points = itertools.product(*(self.grid[k] for k in keys))
        # Seeds outermost: a sweep cut short has covered the whole grid for its first seeds.
        return [Child(i, dict(zip(keys, values)), seed)
                for i, (seed, values) in enumerate(itertools.product(self.seeds or [None], list(points)))]


def _find_base(file: Path, base: str) -> Path:
    for candidate in (file.parent / base, Path(base)):
        if candidate.is_file():
            return candidate
    raise UsageError(f"{file}: base config {base!r} not found (looked beside the sweep file and in {Path.cwd()})")


@dataclass
class Child:
    """One grid point (and seed): one fit, one MLflow child run."""

    index: int
    values: dict[str, Any]
    seed: int | None

    @property
    def name(self) -> str:
        parts = [f"{short(k)}={v}" for k, v in self.values.items()]
        return ",".join(parts + ([f"seed={self.seed}"] if self.seed is not None else []))

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-" + re.sub(r"[^A-Za-z0-9_.=,-]+", "_", self.name)


def short(key: str) -> str:
    """The last part of a dotted key: model.init_args.hybrid_ratio -> hybrid_ratio."""
    return key.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------------- configs


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
    for entry in (list(logger) if isinstance(logger, ListConfig) else [logger]):
        if isinstance(entry, DictConfig) and str(entry.get("class_path", "")).endswith("MLFlowLogger"):
            return entry
    raise UsageError("a sweep's base config needs trainer.logger to be an MLFlowLogger (ivl.callbacks.mlflow_logger."
                     "BufferedMLFlowLogger, or Lightning's) "
                     "(the parent and child runs live in MLflow)")


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
    from ivl.experiments.cli import parse_only

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


# ------------------------------------------------------------------------------------------------------ MLflow


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
        run = self.client.create_run(self.experiment_id, run_name=sweep.name,
                                     tags={"ivl.sweep": sweep.name, "ivl.sweep_file": str(sweep.file)})
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
        tags = {"mlflow.parentRunId": parent, "ivl.sweep": sweep.name,
                **{k: json.dumps(v) for k, v in child.values.items()}}
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


# ------------------------------------------------------------------------------------------------------- running


@dataclass
class Running:
    child: Child
    run_id: str
    folder: Path
    process: subprocess.Popen
    log: Any
    slot: int | None
    started: float


def _start(tracking: Tracking, child: Child, run_id: str, folder: Path, extra: list[str], gpu: int | None,
           echo: bool, subcommand: str = "fit", slot: int | None = None) -> Running:
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
    print(f"[sweep] {running.child.name}: FAILED (exit {code}) after {took:.0f} s; log: {running.folder / 'fit.log'}\n"
          + "\n".join(f"    {line}" for line in tail[-5:]), flush=True)
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
            raise UsageError(f"--parallel {parallel} with {per_gpu} child(ren) per GPU needs {gpus} GPUs, but "
                             f"{torch.cuda.device_count()} CUDA GPUs are visible")
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
                active.append(_start(tracking, child, run_id, folder, extra, gpu, echo=False,
                                     subcommand=sweep.subcommand, slot=slot))
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


# ------------------------------------------------------------------------------------------------------ summary


def summarise(tracking: Tracking, sweep: Sweep, base: DictConfig, children: list[Child], run_ids: dict[str, str],
              parent: str, root: Path) -> list[dict]:
    """Writes summary.csv, summary.md and summary.png under ``root`` and logs them to the parent run."""
    metric, mode = monitored(base)
    rows, val_keys = [], set()
    for child in children:
        run = tracking.client.get_run(run_ids[child.folder_name])
        metrics = run.data.metrics
        val_keys.update(k for k in metrics if k.startswith("val/"))
        row = {"child": child.name, "status": run.info.status,
               **{short(k): v for k, v in child.values.items()}}
        if sweep.seeds:
            row["seed"] = child.seed
        if metric is not None:
            history = [m.value for m in tracking.client.get_metric_history(run.info.run_id, metric)]
            row[f"{metric} (final)"] = history[-1] if history else None
            row[f"{metric} (best)"] = (max if mode == "max" else min)(history) if history else None
        row["_metrics"] = metrics
        rows.append(row)
    for row in rows:
        metrics = row.pop("_metrics")
        for key in sorted(val_keys - ({metric} if metric else set())):
            row[key] = metrics.get(key)

    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (root / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, columns)
    (root / "summary.md").write_text(f"# Sweep {sweep.name}\n\n{table}\n")
    files = [root / "summary.csv", root / "summary.md"]
    if metric is not None and any(row.get(f"{metric} (best)") is not None for row in rows):
        plot(rows, [short(k) for k in sweep.grid], f"{metric} (best)", root / "summary.png")
        files.append(root / "summary.png")
    tasks = sorted({k for row in rows for k in row if k.startswith(TASK_PREFIX)}, key=_natural)
    if tasks:
        plot_tasks(rows, [short(k) for k in sweep.grid], tasks, root / "summary_tasks.png")
        files.append(root / "summary_tasks.png")
        best = [row[f"{metric} (best)"] for row in rows if row.get(f"{metric} (best)") is not None]
        tracking.client.log_metric(parent, f"best/{metric}", (max if mode == "max" else min)(best))
    for path in files:
        tracking.client.log_artifact(parent, str(path))
    print(f"\n{table}\n\n[sweep] summary: {root / 'summary.md'}, {root / 'summary.csv'}", flush=True)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


LONG_LABEL = 24  # characters that fit under a plot's axis


def tick_labels(values: list) -> list[str]:
    """Readable names for a swept key's values. A long path (a student folder, say) is cut to the fewest trailing
    parts that still tell the values apart: a whole path does not fit under a plot's axis. Short values with a
    slash ("1/4") stay whole."""
    texts = [str(v) for v in values]
    long = [t for t in texts if "/" in t and len(t) > LONG_LABEL]
    paths = [t.split("/") for t in long]
    for n in range(1, max((len(p) for p in paths), default=0) + 1):
        if len({"/".join(p[-n:]) for p in paths}) == len(set(map(tuple, paths))):
            break
    else:
        return texts
    return [("…/" + "/".join(t.split("/")[-n:]) if t.count("/") >= n else t) if t in long else t for t in texts]


def plot(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    """One panel per swept key: the metric against the key's values, one line per combination of the other keys,
    mean over seeds with their standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = {}
    for key in keys:
        values = list(dict.fromkeys(row[key] for row in rows))
        name[key] = dict(zip(values, tick_labels(values)))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        values = list(dict.fromkeys(row[key] for row in rows))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        x_of = {v: (v if numeric else i) for i, v in enumerate(values)}
        for group in dict.fromkeys(tuple(row[k] for k in others) for row in rows):
            xs, means, stds = [], [], []
            for v in values:
                got = [row[metric] for row in rows if row[key] == v and tuple(row[k] for k in others) == group
                       and row.get(metric) is not None]
                if got:
                    xs.append(x_of[v]), means.append(float(np.mean(got))), stds.append(float(np.std(got)))
            label = ", ".join(f"{k}={name[k][g]}" for k, g in zip(others, group)) or None
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        if not numeric:
            ax.set_xticks(range(len(values)), [name[key][v] for v in values], rotation=20, ha="right", fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TASK_PREFIX = "val/accuracy/"  # InstructModule's per-task exact match


def _natural(key: str) -> list:
    """Sort key with numbers compared as numbers: passkey/2x before passkey/16x."""
    return [float(p) if re.fullmatch(r"\d+(\.\d+)?", p) else p for p in re.split(r"(\d+(?:\.\d+)?)", key)]


def plot_tasks(rows: list[dict], keys: list[str], tasks: list[str], path: Path) -> None:
    """Final per-task accuracy (x: the tasks in natural order, e.g. passkey distances), one line per grid point,
    mean over seeds with their standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = {}
    for key in keys:
        values = list(dict.fromkeys(row[key] for row in rows))
        name[key] = dict(zip(values, tick_labels(values)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(tasks) + 2), 3.8))
    for point in dict.fromkeys(tuple(row[k] for k in keys) for row in rows):
        group = [row for row in rows if tuple(row[k] for k in keys) == point]
        means, stds = [], []
        for task in tasks:
            got = [row[task] for row in group if row.get(task) is not None]
            means.append(float(np.mean(got)) if got else float("nan"))
            stds.append(float(np.std(got)) if got else 0.0)
        ax.errorbar(range(len(tasks)), means, yerr=stds, marker="o", capsize=3,
                    label=", ".join(f"{k}={name[k][v]}" for k, v in zip(keys, point)))
    ax.set_xticks(range(len(tasks)), [t.removeprefix(TASK_PREFIX) for t in tasks], rotation=30, ha="right")
    ax.set_ylabel("accuracy (final)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivl.experiments sweep",
        description="Runs a grid of fits as MLflow child runs of one parent run (see ivl/experiments/sweep.py).",
        epilog="Arguments after the sweep file (e.g. --trainer.max_steps=2) apply to every child as in fit.")
    parser.add_argument("--config", required=True, help="the sweep file (YAML: base, grid, seeds, overrides, name)")
    parser.add_argument("--parallel", type=int, default=1, help="children at once, one per GPU (default 1)")
    parser.add_argument("--per-gpu", type=int, default=1,
                        help="children sharing one GPU when --parallel runs several (default 1): for models too "
                             "small to fill a GPU")
    known, extra = parser.parse_known_args(args)
    try:
        failed = run(known.config, extra, known.parallel, known.per_gpu)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if failed:
        print(f"[sweep] {failed} children failed", file=sys.stderr)
    return 1 if failed else 0
