"""Where the time goes: CUDA kernels of one steady-state prefill chunk and of one decode step, 4B shapes.

The prefill chunk runs after a first chunk has filled the cache (so attention sees a full window and Gated
DeltaNet carries state), the decode step on the static cache outside a CUDA graph, so that every kernel shows:
their summed GPU time is what a graph replay cannot go below. Prints the top kernels and the totals.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ivl.bench.inference import build_infinitevl
from ivl.model.decoding.static_cache import StaticCache, decode_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=25, help="kernels listed per phase")
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"])
    parser.add_argument("--trace", default=None, help="also write Chrome traces with this path prefix")


def _kernels(prof) -> tuple[int, float]:
    """(kernel count, summed kernel time in ms) of a profile."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def _report(name, prof, wall_ms, args) -> None:
    count, total = _kernels(prof)
    print(f"\n## {name}: wall {wall_ms:.2f} ms, {count} kernels, {total:.2f} ms of kernel time\n")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(f"{args.trace}-{name.split()[0]}.json")


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    model = build_infinitevl(args.shapes, "cuda", torch.bfloat16)
    lm, B, T = model.lm, args.batch, args.chunk
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {B} | chunk {T}")
    ids = torch.randint(0, 150000, (B, 3 * T), device="cuda")
    cache = lm.new_cache()
    lm.hidden_states(ids[:, :T], cache=cache)  # fills the window; also compiles and autotunes
    lm.hidden_states(ids[:, T : 2 * T], cache=cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        lm.hidden_states(ids[:, 2 * T :], cache=cache)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    _report(f"prefill chunk of {T} tokens", prof, wall, args)

    static = StaticCache.from_cache(lm, cache, B)
    token = ids[:, -1].clone()
    position = torch.full((3, B, 1), 3 * T, device="cuda")
    index = torch.tensor(3 * T, device="cuda")
    for _ in range(3):
        decode_step(lm, static, token, position, index)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        decode_step(lm, static, token, position, index)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    _report("decode step (static cache, no graph)", prof, wall, args)
