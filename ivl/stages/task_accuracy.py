"""Exact-match accuracy per task, agreed across processes even when they saw different tasks."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TaskAccuracy:
    """Counts per task name over a validation epoch. ``compute`` first takes the union of the task names every
    process has seen, then sums the counts, so each process logs the same tasks with the same values (a
    torchmetrics metric per task, created as tasks appear, would have different sets per rank and mismatch)."""

    def __init__(self):
        self.correct: dict[str, float] = {}
        self.seen: dict[str, float] = {}

    def update(self, tasks: list[str | None], correct: torch.Tensor) -> None:
        """``correct``: [samples] 1.0 / 0.0, NaN where a sample had nothing to score."""
        for task, ok in zip(tasks, correct.tolist()):
            if task is None or ok != ok:
                continue
            self.correct[task] = self.correct.get(task, 0.0) + ok
            self.seen[task] = self.seen.get(task, 0.0) + 1.0

    def compute(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """{task: accuracy} over every process's samples. A collective call when distributed: all ranks call it."""
        tasks = sorted(self.seen)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            names: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(names, tasks)
            tasks = sorted(set().union(*names))
        counts = torch.tensor(
            [[self.correct.get(t, 0.0), self.seen.get(t, 0.0)] for t in tasks], dtype=torch.float64, device=device
        ).reshape(-1, 2)
        if distributed:
            dist.all_reduce(counts)
        return {task: float(c / n) for task, (c, n) in zip(tasks, counts.tolist()) if n > 0}

    def reset(self) -> None:
        self.correct.clear()
        self.seen.clear()
