"""Batch-1 matrix-vector products at the decode step's weight shapes: cuBLAS against ivl's Triton kernel.

Every weight shape of a decode step of the chosen preset (packed as the decoder reads them) is timed as
``F.linear`` (cuBLAS) and as ``ivl.kernels.gemv`` with the tile shapes ``config_for`` picks; ``--sweep`` also
tries a grid of tile shapes and prints the fastest, which is how ``config_for`` was chosen. Each product runs over
enough copies of its weight (1 GiB or more together) that every read comes from HBM, as in a decode step, and the
products are replayed in a CUDA graph so that launches do not count. A device-to-device copy (as the decode
roofline measures it) gives the bandwidth to aim for.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import statistics
from collections import Counter

import torch
import torch.nn.functional as F

from ivl.bench.inference import hbm_bandwidth
from ivl.model import HybridConfig
from ivl.model.mixers import LINEAR_MIXERS, mixer_class


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="infinitevl-4b")
    parser.add_argument(
        "--linear-mixer", choices=LINEAR_MIXERS, help="the mixer of the preset's linear layers (default: the preset's)"
    )
    parser.add_argument("--sweep", action="store_true", help="also search tile shapes per weight shape")
    parser.add_argument("--replays", type=int, default=20)


def decode_shapes(config: HybridConfig) -> list[tuple[str, int, int, int]]:
    """(name, rows, cols, products per decode step) of every weight matrix a decode step reads: each mixer's
    ``decode_matrices`` (one mixer of each kind, built without memory), the MLPs' and the LM head."""
    shapes = []
    with torch.device("meta"):
        for kind, count in Counter(config.layer_types).items():
            mixer = mixer_class(kind)(config, config.layer_types.index(kind))
            shapes += [(m.name, m.rows, m.cols, count) for m in mixer.decode_matrices()]
    d, i = config.hidden_size, config.intermediate_size
    return shapes + [
        ("MLP gate/up", 2 * i, d, config.num_layers),
        ("MLP down", d, i, config.num_layers),
        ("LM head", config.vocab_size, d, 1),
    ]


def graph_time_ms(fn, replays: int) -> float:
    """Median time of one ``fn()`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(args: argparse.Namespace) -> None:
    from ivl.kernels import gemv

    if not torch.cuda.is_available() or not gemv.ENABLED:
        raise SystemExit("ivl.bench gemv times GPU kernels; it needs CUDA and Triton")
    config = HybridConfig.preset(args.preset, **({"linear_mixer": args.linear_mixer} if args.linear_mixer else {}))
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bfloat16 | {datetime.date.today()} | "
        f"preset {args.preset} ({config.linear_mixer}), batch 1\n"
    )
    print(f"device copy: {hbm_bandwidth('cuda') / 1e12:.2f} TB/s (bytes read + written; the decode roofline's)\n")
    print(
        "| weight | shape | MB | per step | cuBLAS us (TB/s) | Triton us (TB/s), tiles | best swept us (TB/s), tiles |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = [0.0, 0.0]
    for name, N, K, count in decode_shapes(config):
        nbytes = N * K * 2
        copies = max(2, math.ceil((1 << 30) / nbytes))
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(K, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(N, device="cuda", dtype=torch.bfloat16)
        reference = F.linear(x.float(), weights[0].float())
        error = ((gemv.gemv(x, weights[0]).float() - reference).norm() / reference.norm()).item()
        if error > 1e-2:
            raise SystemExit(f"{name}: Triton product differs from the float32 product by {error:.2e}")

        def per_product_us(product, weights=weights, copies=copies) -> float:
            return 1000 * graph_time_ms(lambda: [product(w) for w in weights], args.replays) / copies

        cublas = per_product_us(lambda w: F.linear(x, w))
        tiles = gemv.config_for(N, K)
        ours = per_product_us(lambda w: gemv.launch(x, w, None, out, *tiles))
        cells = [f"{us:.1f} ({nbytes / us / 1e6:.2f})" for us in (cublas, ours)]
        cells[1] += f", {tiles}"
        best = ""
        if args.sweep:
            timed = {}
            grid = itertools.product([1, 2, 4, 8, 16, 32], [128, 256, 512, 1024, 2048, 4096], [2, 4, 8], [1, 3])
            for block_n, block_k, warps, stages in grid:
                if not 2048 <= block_n * block_k <= 16384 or block_k > K:
                    continue
                timed[(block_n, block_k, warps, stages)] = per_product_us(
                    lambda w: gemv.launch(x, w, None, out, block_n, block_k, warps, stages)
                )
            tiles_best, us = min(timed.items(), key=lambda item: item[1])
            best = f"{us:.1f} ({nbytes / us / 1e6:.2f}), {tiles_best}"
        totals[0] += count * cublas
        totals[1] += count * ours
        print(f"| {name} | {N} x {K} | {nbytes / 1e6:.1f} | {count} | {cells[0]} | {cells[1]} | {best} |", flush=True)
        del weights
        torch.cuda.empty_cache()
    print(f"\nall products of one decode step: cuBLAS {totals[0] / 1000:.2f} ms, Triton {totals[1] / 1000:.2f} ms")
