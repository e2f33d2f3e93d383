"""A sweep's summary in its parent run: each child's grid values and metrics as a table (``summary.csv``,
``summary.md``) and plots of the monitored metric and of per-task accuracy."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ivl.experiments.child_configs import monitored
from ivl.experiments.plots import TASK_PREFIX, plot, plot_tasks
from ivl.experiments.spec import Child, Sweep, short
from ivl.experiments.tracking import Tracking


def summarise(
    tracking: Tracking,
    sweep: Sweep,
    base: DictConfig,
    children: list[Child],
    run_ids: dict[str, str],
    parent: str,
    root: Path,
) -> list[dict]:
    """Writes summary.csv, summary.md and summary.png under ``root`` and logs them to the parent run."""
    metric, mode = monitored(base)
    rows, val_keys = [], set()
    for child in children:
        run = tracking.client.get_run(run_ids[child.folder_name])
        metrics = run.data.metrics
        val_keys.update(k for k in metrics if k.startswith("val/"))
        row = {"child": child.name, "status": run.info.status, **{short(k): v for k, v in child.values.items()}}
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


def _natural(key: str) -> list:
    """Sort key with numbers compared as numbers: passkey/2x before passkey/16x."""
    return [float(p) if re.fullmatch(r"\d+(\.\d+)?", p) else p for p in re.split(r"(\d+(?:\.\d+)?)", key)]
