"""Decode attention over the window's ring: time per layer and the bandwidth it reads keys and values at.

Each of ``ivl.kernels.window_attention``'s decode kernels (``DECODE_KERNEL``) runs, compiled as in the decode step,
over one ring per attention layer of the preset (a full window of keys and values per row, each in its own memory,
so that reads come from HBM as in a decode step), replayed in a CUDA graph so that launches do not count. The
bandwidth to aim for is a device-to-device copy's.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from ivl.bench.gemv import graph_time_ms
from ivl.bench.inference import hbm_bandwidth
from ivl.kernels import window_attention
from ivl.model import HybridConfig

KERNELS = ("matmul", "split")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="infinitevl-4b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--replays", type=int, default=20)


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ivl.bench ring times GPU kernels; it needs CUDA")
    config = HybridConfig.preset(args.preset)
    layers, S = len(config.attention_layers), config.window
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    peak = hbm_bandwidth("cuda")
    print(
        f"# {datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__}: {args.preset}, "
        f"{layers} attention layers, ring {S}, {Hq} query / {Hkv} key-value heads of {D}, bf16; "
        f"copy bandwidth {peak / 1e12:.2f} TB/s"
    )
    print("| kernel | batch | us per layer | TB/s | of copy | max abs diff to matmul |")
    print("|---|---|---|---|---|---|")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # kernels x batches
    step = torch.compile(window_attention.ring_decode_attention, fullgraph=True, dynamic=False)
    chosen = window_attention.DECODE_KERNEL
    for B in args.batch:
        q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
        rings = [
            (
                torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
                torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
            )
            for _ in range(layers)
        ]
        visible = torch.rand(B, S, device="cuda") < 0.9
        visible[:, 0] = True
        ring_bytes = 2 * B * Hkv * S * D * 2
        outputs = {}
        for kernel in KERNELS:
            window_attention.DECODE_KERNEL = kernel  # a guard of the compiled step: changing it recompiles

            def all_layers():
                for keys, values in rings:
                    step(q, keys, values, visible)

            ms = graph_time_ms(all_layers, args.replays) / layers
            outputs[kernel] = step(q, *rings[0], visible).float()
            diff = (outputs[kernel] - outputs["matmul"]).abs().max().item()
            tbs = ring_bytes / (ms * 1e-3) / 1e12
            print(f"| {kernel} | {B} | {ms * 1e3:.1f} | {tbs:.2f} | {tbs * 1e12 / peak:.0%} | {diff:.1e} |")
    window_attention.DECODE_KERNEL = chosen
