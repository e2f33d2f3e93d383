"""Continuous video ingestion: frames/s of prefill, with memory and latency sampled over the stream.

A synthetic stream of frames at a fixed resolution is fed, one temporal patch (2 frames) at a time, through the
vision tower and into the language model's cache, as one unbounded video: multimodal RoPE positions advance on
the time axis by tokens_per_second * seconds per patch, height and width positions repeat per frame. InfiniteVL
keeps its constant-memory cache; the Transformer baseline (transformers Qwen2.5-VL, sdpa, growing KV cache) runs
until it runs out of memory or frames.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from ivl.bench.inference import _peak, _reset, _sync, build

FRAMES_PER_PATCH = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--frame-size", type=int, default=224, help="square frame side in pixels (multiple of 28)")
    parser.add_argument("--fps", type=float, default=2.0, help="frame rate of the stream (sets the time axis)")
    parser.add_argument("--sample-every", type=int, default=100, help="frames between memory/latency samples")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/stream.png"))


def _patch_inputs(side: int, device, dtype):
    grid = side // 14
    pixels = torch.randn(grid * grid, 3 * FRAMES_PER_PATCH * 14 * 14, device=device, dtype=dtype)
    return pixels, torch.tensor([[1, grid, grid]], device=device)


def _positions(t: int, grid: int, interval: float, device) -> torch.Tensor:
    """[3, 1, tokens] for temporal patch t of the stream (merged 2x2 patches)."""
    h = w = grid // 2
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    time_axis = torch.full_like(rows, int(t * interval))
    return torch.stack([time_axis, rows, cols])[:, None]


@torch.no_grad()
def stream_infinitevl(model, args, dtype):
    lm, device = model.lm, args.device
    cache = lm.new_cache()
    pixels, grid_thw = _patch_inputs(args.frame_size, device, dtype)
    grid = args.frame_size // 14
    interval = model.config.tokens_per_second * FRAMES_PER_PATCH / args.fps
    return _run(args, lambda t: lm.hidden_states(
        inputs_embeds=model.visual(pixels, grid_thw=grid_thw).pooler_output[None].to(dtype),
        position_ids=_positions(t, grid, interval, device), cache=cache))


@torch.no_grad()
def stream_baseline(model, args, dtype):
    device = args.device
    pixels, grid_thw = _patch_inputs(args.frame_size, device, dtype)
    grid = args.frame_size // 14
    interval = model.config.vision_config.tokens_per_second * FRAMES_PER_PATCH / args.fps
    text_model = model.model.language_model
    state = {"past": None}

    def step(t):
        embeds = model.model.visual(pixels, grid_thw=grid_thw).pooler_output[None].to(dtype)
        out = text_model(inputs_embeds=embeds, position_ids=_positions(t, grid, interval, device),
                         past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
    return _run(args, step)


def _run(args, step):
    """(frames done, frames/s, samples [(frame, ms per frame, GiB)]); stops at OOM."""
    _reset(args.device)
    samples, done, window_start = [], 0, time.perf_counter()
    start = window_start
    patches = args.frames // FRAMES_PER_PATCH
    for t in range(patches):
        try:
            step(t)
        except torch.OutOfMemoryError:
            break
        done += FRAMES_PER_PATCH
        if done % args.sample_every == 0 or t == patches - 1:
            _sync(args.device)
            now = time.perf_counter()
            frames_in_window = args.sample_every if done % args.sample_every == 0 else done % args.sample_every
            memory = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            samples.append((done, (now - window_start) / frames_in_window * 1e3, memory))
            window_start = now
    _sync(args.device)
    return done, done / (time.perf_counter() - start), samples, _peak(args.device)


def run(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, baseline = build(args.shapes, args.device, dtype)
    tokens = (args.frame_size // 28) ** 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# {name} | torch {torch.__version__} | {dtype} | {datetime.date.today()} | frames {args.frame_size}px, "
          f"{tokens} tokens per {FRAMES_PER_PATCH} frames\n")
    print("| model | frames ingested | frames/s | first / last ms per frame | memory first / last GiB | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = {"InfiniteVL": stream_infinitevl(model, args, dtype)}
    if args.baseline:
        del model
        results["Qwen2.5-VL (sdpa)"] = stream_baseline(baseline, args, dtype)
    for label, (done, fps, samples, peak) in results.items():
        first, last = samples[0], samples[-1]
        status = "" if done == args.frames else " (OOM)"
        print(f"| {label} | {done}{status} | {fps:.1f} | {first[1]:.1f} / {last[1]:.1f} | {first[2]:.2f} / "
              f"{last[2]:.2f} | {peak:.2f} |")
    plot(results, args.plot)
    print(f"\nplot: {args.plot}")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, (_, _, samples, _) in results.items():
        frames = [s[0] for s in samples]
        latency.plot(frames, [s[1] for s in samples], label=label)
        memory.plot(frames, [s[2] for s in samples], label=label)
    latency.set_title("latency (ms per frame)")
    memory.set_title("memory allocated (GiB)")
    for ax in (latency, memory):
        ax.set_xlabel("frames ingested")
        ax.grid(alpha=0.3)
    latency.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
