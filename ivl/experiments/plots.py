"""The sweep summary's plots: a metric against each swept key, and per-task accuracy per grid point."""

from __future__ import annotations

from pathlib import Path

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

    name = _labels(rows, keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        values = list(dict.fromkeys(row[key] for row in rows))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        x_of = {v: (v if numeric else i) for i, v in enumerate(values)}
        for group in dict.fromkeys(tuple(row[k] for k in others) for row in rows):
            xs, means, stds = [], [], []
            for v in values:
                got = [
                    row[metric]
                    for row in rows
                    if row[key] == v and tuple(row[k] for k in others) == group and row.get(metric) is not None
                ]
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


def plot_tasks(rows: list[dict], keys: list[str], tasks: list[str], path: Path) -> None:
    """Final per-task accuracy (x: the tasks in natural order, e.g. passkey distances), one line per grid point,
    mean over seeds with their standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = _labels(rows, keys)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(tasks) + 2), 3.8))
    for point in dict.fromkeys(tuple(row[k] for k in keys) for row in rows):
        group = [row for row in rows if tuple(row[k] for k in keys) == point]
        means, stds = [], []
        for task in tasks:
            got = [row[task] for row in group if row.get(task) is not None]
            means.append(float(np.mean(got)) if got else float("nan"))
            stds.append(float(np.std(got)) if got else 0.0)
        ax.errorbar(
            range(len(tasks)),
            means,
            yerr=stds,
            marker="o",
            capsize=3,
            label=", ".join(f"{k}={name[k][v]}" for k, v in zip(keys, point)),
        )
    ax.set_xticks(range(len(tasks)), [t.removeprefix(TASK_PREFIX) for t in tasks], rotation=30, ha="right")
    ax.set_ylabel("accuracy (final)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _labels(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """Per key, each of its values (in order of first appearance) -> its tick label."""
    name = {}
    for key in keys:
        values = list(dict.fromkeys(row[key] for row in rows))
        name[key] = dict(zip(values, tick_labels(values)))
    return name
