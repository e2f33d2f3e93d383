"""Score against the number of sampled frames, one line per video benchmark (the paper's frames-vs-score curve)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def score_against_frames(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = defaultdict(list)
    for r in results:
        if r.get("frames"):
            curves[r["benchmark"]].append((r["frames"], 100 * r["score"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(curves.items()):
        points.sort()
        ax.plot([f for f, _ in points], [s for _, s in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("frames sampled per video")
    ax.set_ylabel("score (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
