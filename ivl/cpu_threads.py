"""Torch's CPU threads, capped at the CPUs this process may actually use.

torch sizes its intra-op thread pool from the CPUs the process may be scheduled on (OpenMP's count), which a
container's CPU quota (cgroup CPU bandwidth) does not shrink. In a 2-CPU container on a large host it starts one
thread per host core, and every product's threads then take turns on the 2 CPUs: the demo's training batches
slow down with every thread beyond the CPUs (docs/benchmarks.md, "Demo").
"""

from __future__ import annotations

import os

import torch

CHOSEN_BY_USER = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def fit_threads_to_cpus() -> int | None:
    """Lower torch's intra-op threads to the CPUs this process may use (its affinity and cgroup quota, as joblib
    counts them) when torch would run more and the user has not chosen (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``).
    ``OMP_NUM_THREADS`` is set too, so that the processes it starts (sweep children, model and data workers) start
    with the same count. Returns the new thread count, or None when nothing changed."""
    if any(os.environ.get(name) for name in CHOSEN_BY_USER):
        return None
    from joblib import cpu_count

    usable, threads = cpu_count(), torch.get_num_threads()
    if threads <= usable:
        return None
    torch.set_num_threads(usable)
    os.environ["OMP_NUM_THREADS"] = str(usable)
    print(
        f"ivl: this process may use {usable} CPU(s); torch's {threads} threads lowered to {usable} "
        f"(set OMP_NUM_THREADS to choose)",
        flush=True,
    )
    return usable
