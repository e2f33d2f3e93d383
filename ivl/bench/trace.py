"""Where a profiled step's GPU time went, read from its Chrome trace (``torch.profiler``'s export).

The question a slow multi-GPU step raises is whether the GPU waits (on the host launching kernels, or on
communication it cannot overlap) or computes slowly. From the kernels in the trace: the step's span (first
kernel start to last kernel end), how long some compute kernel was running on the GPU (the union of their
intervals over all compute streams), how long communication kernels (NCCL) ran and how much of that overlapped
compute, and the kernel time per kind (matrix products, fla's Triton kernels, attention, other).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

KINDS = (  # first match wins; names as CUDA kernels are called in traces of torch, cuBLAS, fla and NCCL
    ("communication", ("nccl",)),
    ("matrix products", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")),
    ("attention", ("flash", "flex", "attention", "fmha", "sdpa")),
    (
        "gated delta rule (fla)",
        ("chunk_", "recompute_w_u", "prepare_wy", "solve_tril", "chunk_local_cumsum", "l2norm", "causal_conv1d"),
    ),
    ("optimizer", ("adam", "multi_tensor_apply")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by both interval sets: |A| + |B| - |A u B|."""
    return _union(a) + _union(b) - _union(a + b)


def summarise(trace: dict | str | Path) -> dict:
    """Summary of the GPU kernels of a Chrome trace (a dict, or a path to ``.json`` / ``.json.gz``); times in ms."""
    if not isinstance(trace, dict):
        path = Path(trace)
        with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
            trace = json.load(f)
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise ValueError("the trace has no GPU kernels (was CUDA profiled?)")
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    comm = [s for s, e in zip(spans, kernels) if kind_of(e["name"]) == "communication"]
    compute = [s for s, e in zip(spans, kernels) if kind_of(e["name"]) != "communication"]
    step = max(b for _, b in spans) - min(a for a, _ in spans)
    by_kind: dict[str, float] = {}
    for (a, b), e in zip(spans, kernels):
        by_kind[kind_of(e["name"])] = by_kind.get(kind_of(e["name"]), 0.0) + (b - a)
    busy = _union(compute)
    by_name: dict[str, list] = {}
    for (a, b), e in zip(spans, kernels):
        entry = by_name.setdefault(e["name"], [0, 0.0])
        entry[0], entry[1] = entry[0] + 1, entry[1] + (b - a)
    return {
        "kernels": len(kernels),
        "step_ms": step / 1e3,
        "compute_busy_ms": busy / 1e3,
        "compute_idle_ms": (step - busy) / 1e3,
        "communication_ms": _union(comm) / 1e3,
        "communication_overlapped_ms": _overlap(comm, compute) / 1e3,
        "by_kind_ms": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        # where "other" goes is the next question a summary raises: every kernel, longest total first
        "by_kernel": [
            {"name": n, "kind": kind_of(n), "calls": c, "ms": t / 1e3}
            for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])
        ],
    }


def format_summary(summary: dict, top_other: int = 25) -> str:
    lines = [
        f"step {summary['step_ms']:.1f} ms over {summary['kernels']} kernels: compute busy "
        f"{summary['compute_busy_ms']:.1f} ms, idle {summary['compute_idle_ms']:.1f} ms; communication "
        f"{summary['communication_ms']:.1f} ms, {summary['communication_overlapped_ms']:.1f} ms of it "
        f"under compute"
    ]
    lines += [f"  {kind:<24} {ms:9.1f} ms" for kind, ms in summary["by_kind_ms"].items()]
    lines += ["", '  the longest kernels of kind "other" (total ms, calls):']
    others = [k for k in summary["by_kernel"] if k["kind"] == "other"][:top_other]
    lines += [f"  {k['ms']:9.1f} ms {k['calls']:6d}  {k['name'][:100]}" for k in others]
    return "\n".join(lines)
