"""The prefill chunk's matrix products in FP8 against bf16, at the preset's weight shapes: what FP8 could save.

Every weight a prefill chunk multiplies (each mixer's projections, the MLPs; the LM head runs on one row) is timed
over a chunk of tokens as ``F.linear`` in bf16 and as ``torch._scaled_mm`` in float8 e4m3 with row-wise scales
(per token for the activations, per output channel for the weights, both computed in float32), the activations'
quantisation included and the weights quantised once beforehand. Also printed: the relative error of each FP8
product against the bf16 one on random inputs (a model's activations have outliers that random data lacks, so
this is a floor, not the accuracy on a real model).
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F

from ivl.bench.gemv import decode_shapes, graph_time_ms
from ivl.model import HybridConfig

E4M3_MAX = 448.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="infinitevl-4b")
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the activations: one prefill chunk")
    parser.add_argument("--replays", type=int, default=10)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~ e4m3 * scale."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("ivl.bench fp8 needs a GPU with FP8 tensor cores (Ada or Hopper)")
    config = HybridConfig.preset(args.preset)
    T = args.tokens
    quantize = torch.compile(quantize_rows, dynamic=False)
    print(
        f"# {datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__}: {args.preset}, "
        f"{T} tokens per chunk"
    )
    print("| weight | shape | per chunk | bf16 ms | fp8 ms (quantisation included) | speed-up | relative error |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, rows, cols, count in decode_shapes(config):
        if name == "LM head":
            continue
        x = torch.randn(T, cols, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * cols**-0.5
        w8, w_scale = quantize_rows(w)  # per output channel

        def fp8():
            x8, x_scale = quantize(x)
            return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)

        bf16_ms = graph_time_ms(lambda: F.linear(x, w), args.replays)
        fp8_ms = graph_time_ms(fp8, args.replays)
        exact = F.linear(x.float(), w.float())
        err = ((fp8().float() - exact).norm() / exact.norm()).item()
        bf16_err = ((F.linear(x, w).float() - exact).norm() / exact.norm()).item()
        totals[0] += bf16_ms * count
        totals[1] += fp8_ms * count
        print(
            f"| {name} | {rows} x {cols} | {count} | {bf16_ms:.3f} | {fp8_ms:.3f} | {bf16_ms / fp8_ms:.2f}x | "
            f"{err:.1e} (bf16 {bf16_err:.1e}) |"
        )
    print(f"| all products of a chunk | | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.2f}x | |")
