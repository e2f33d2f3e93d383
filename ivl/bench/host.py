"""Host time against GPU time of training a few hybrid layers: whether Python, not the GPU, bounds the step.

Runs forward and backward of the first ``--layers`` blocks of the 4B language model (random weights, bf16, one
packed batch of two sequences) ``--iters`` times without synchronising, then synchronises: the first time is what
the host needs to launch the work, the second what the GPU needs to run it. A host time near or above the GPU time
means the GPU waits for launches.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import ivl.model.mixers.gated_deltanet as gated_deltanet
from ivl.bench.random_models import teacher_config
from ivl.model.convert import student_config
from ivl.model.lm import HybridLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4, help="the first N blocks (1 attention + 3 Gated DeltaNet)")
    parser.add_argument("--length", type=int, default=8192, help="tokens per step")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--one-by-one", action="store_true", help="run Gated DeltaNet's input projections and convolutions one by one"
    )
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])


def run(args: argparse.Namespace) -> None:
    if args.one_by_one:
        gated_deltanet.PROJECT_AT_ONCE_MIN_TOKENS = 2**62
    config = student_config(teacher_config(args.shapes), 0.25, args.length).text
    config = dataclasses.replace(config, num_layers=args.layers, layer_types=config.layer_types[: args.layers])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    lm = HybridLM(config).to(args.device, dtype)
    T = args.length
    ids = torch.randint(0, config.vocab_size, (1, T), device=args.device)
    cu = torch.tensor([0, T // 2, T], dtype=torch.int32, device=args.device)

    def step():
        lm.hidden_states(ids, cu_seqlens=cu).float().square().mean().backward()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # compilation, autotuning
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    host = (time.perf_counter() - start) / args.iters
    sync()
    wall = (time.perf_counter() - start) / args.iters
    print(
        f"{args.layers} layers ({', '.join(config.layer_types)}), forward + backward at {T} tokens"
        f"{', projections one by one' if args.one_by_one else ''}: launched in {host * 1e3:.1f} ms, "
        f"finished in {wall * 1e3:.1f} ms per step"
    )
