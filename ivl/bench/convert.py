"""Convert a Qwen2.5-VL-3B-shaped teacher (random weights) and run an image+text prompt: sizes, memory, speed.

Builds the teacher with transformers at the real Qwen2.5-VL-3B shapes (bf16, on the GPU), converts it with
``convert_qwen2_5_vl`` (hybrid ratio 1/4), frees the teacher, then prefills an image + text prompt through the
constant-memory cache and decodes tokens one by one.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.model import convert_qwen2_5_vl
from ivl.teachers.qwen2_5_vl import QWEN2_5_VL_3B


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=448, help="square image side in pixels")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hybrid-ratio", type=float, default=0.25)


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ivl.bench convert runs the 4B shapes on a GPU; no CUDA device is visible")
    gib = 2**30
    torch.manual_seed(0)
    with torch.device("cuda"):
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(
            Qwen2_5_VLConfig(**QWEN2_5_VL_3B), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    teacher_params = sum(p.numel() for p in teacher.parameters())
    start = time.perf_counter()
    student, report = convert_qwen2_5_vl(teacher, hybrid_ratio=args.hybrid_ratio, device="cuda")
    convert_s = time.perf_counter() - start
    del teacher
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    counts = student.num_parameters()
    weights_gib = torch.cuda.memory_allocated() / gib

    grid = args.image_size // 14
    image_tokens = grid * grid // 4
    ids = (
        [151644]
        + torch.randint(0, 151000, (args.text_tokens // 2,)).tolist()
        + [151652]
        + [151655] * image_tokens
        + [151653]
        + torch.randint(0, 151000, (args.text_tokens // 2,)).tolist()
    )
    inputs = dict(
        input_ids=torch.tensor([ids], device="cuda"),
        pixel_values=torch.randn(grid * grid, 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16),
        image_grid_thw=torch.tensor([[1, grid, grid]], device="cuda"),
    )
    timings = []
    for _ in range(2):  # the first round compiles kernels; report the second
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = student.generate(**inputs, max_new_tokens=1, stop_token_ids=[])
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        tokens = student.generate(**inputs, max_new_tokens=args.new_tokens, stop_token_ids=[])
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        timings.append((t1 - t0, (t2 - t1 - (t1 - t0)) / max(args.new_tokens - 1, 1)))
    prefill_s, decode_s = timings[-1]
    assert torch.equal(tokens[:, :1], first) and torch.isfinite(torch.tensor(decode_s))
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bfloat16 | {datetime.date.today()}\n")
    print(report, "\n")
    print("| quantity | value |\n| --- | --- |")
    print(f"| teacher parameters (Qwen2.5-VL-3B shapes) | {teacher_params:,} |")
    print(f"| InfiniteVL parameters: total | {counts['total']:,} |")
    print(f"| ... vision tower / language model | {counts['vision']:,} / {counts['language_model']:,} |")
    print(f"| inherited / new | {report.inherited_parameters:,} / {report.new_parameters:,} |")
    print(f"| conversion time (GPU, random teacher) | {convert_s:.1f} s |")
    print(
        f"| prompt | 1 image {args.image_size}x{args.image_size} ({image_tokens} tokens) + "
        f"{len(ids) - image_tokens} text tokens |"
    )
    print(f"| prefill (vision + LM) | {prefill_s * 1e3:.1f} ms |")
    print(f"| decode per token (CUDA-graph steps, generate's default on a GPU) | {decode_s * 1e3:.1f} ms |")
    print(f"| weights in memory | {weights_gib:.2f} GiB |")
    print(f"| peak memory (weights + prefill + decode) | {torch.cuda.max_memory_allocated() / gib:.2f} GiB |")
