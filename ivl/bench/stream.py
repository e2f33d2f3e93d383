"""Continuous video ingestion: frames/s of prefill, with memory and latency sampled over the stream.

A synthetic stream of frames at a fixed resolution is fed, a few frames per step, through the vision tower and
into the language model's cache, as one unbounded video: multimodal RoPE positions advance on the time axis by
tokens_per_second * seconds per temporal patch (2 frames), height and width positions repeat per frame.
InfiniteVL keeps its constant-memory cache; the Transformer baseline (transformers Qwen2.5-VL, sdpa, growing KV
cache) runs until it runs out of memory, frames or its time limit (its per-step cost grows with the stream).
"""

from __future__ import annotations

import argparse
import datetime
import signal
import threading
import time
from pathlib import Path

import torch

from ivl.bench.hf_cache import cache_of, with_cache
from ivl.bench.inference import _peak, _reset, _sync, build_baseline, build_infinitevl

FRAMES_PER_PATCH = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--frame-size", type=int, default=448, help="square frame side in pixels (multiple of 28)")
    parser.add_argument(
        "--frames-per-step", type=int, default=8, help="frames ingested per prefill step (even: whole temporal patches)"
    )
    parser.add_argument("--fps", type=float, default=2.0, help="frame rate of the stream (sets the time axis)")
    parser.add_argument("--sample-every", type=int, default=200, help="frames between memory/latency samples")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--baseline-max-seconds",
        type=float,
        default=180.0,
        help="stop the baseline after this long (it slows down as its cache grows)",
    )
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/stream.png"))


def _step_inputs(args, device, dtype):
    """Pixels and grid of one step's frames (random pixels: cost does not depend on content)."""
    grid, patches = args.frame_size // 14, args.frames_per_step // FRAMES_PER_PATCH
    pixels = torch.randn(patches * grid * grid, 3 * FRAMES_PER_PATCH * 14 * 14, device=device, dtype=dtype)
    return pixels, torch.tensor([[patches, grid, grid]], device=device)


def _positions(step: int, args, interval: float, device) -> torch.Tensor:
    """[3, 1, tokens] for the temporal patches of stream step ``step`` (merged 2x2 patches)."""
    h = w = args.frame_size // 28
    patches = args.frames_per_step // FRAMES_PER_PATCH
    t = step * patches + torch.arange(patches, device=device)
    time_axis = (t * interval).long().repeat_interleave(h * w)
    rows = torch.arange(h, device=device).repeat_interleave(w).repeat(patches)
    cols = torch.arange(w, device=device).repeat(h * patches)
    return torch.stack([time_axis, rows, cols])[:, None]


@torch.no_grad()
def stream_infinitevl(model, args, dtype):
    lm, device = model.lm, args.device
    pixels, grid_thw = _step_inputs(args, device, dtype)
    interval = model.config.tokens_per_second * FRAMES_PER_PATCH / args.fps
    cache = lm.new_cache()

    def step(t):
        lm.hidden_states(
            inputs_embeds=model.visual(pixels, grid_thw=grid_thw).pooler_output[None].to(dtype),
            position_ids=_positions(t, args, interval, device),
            cache=cache,
        )

    # Untimed: compile and autotune for every shape the stream meets (the window fills over the first steps).
    tokens_per_step = (args.frame_size // 28) ** 2 * args.frames_per_step // FRAMES_PER_PATCH
    for t in range(min(lm.config.window // tokens_per_step + 2, -(-args.frames // args.frames_per_step))):
        step(t)
    cache = lm.new_cache()
    return _run(args, step, time_limit=None)


@torch.no_grad()
def stream_baseline(model, args, dtype):
    device = args.device
    pixels, grid_thw = _step_inputs(args, device, dtype)
    interval = model.config.vision_config.tokens_per_second * FRAMES_PER_PATCH / args.fps
    text_model = model.model.language_model
    state = {"past": None}

    def step(t):
        embeds = model.model.visual(pixels, grid_thw=grid_thw).pooler_output[None].to(dtype)
        out = text_model(
            inputs_embeds=embeds,
            position_ids=_positions(t, args, interval, device),
            **with_cache(state["past"]),
            use_cache=True,
        )
        state["past"] = cache_of(out)

    step(0)  # untimed start-up
    state["past"] = None
    return _run(args, step, time_limit=args.baseline_max_seconds)


def _run(args, step, time_limit):
    """(frames done, frames/s, samples [(frame, ms per frame, GiB)], peak GiB, why it stopped early or "")."""
    _reset(args.device)
    samples, done, stopped = [], 0, ""
    start = window_start = time.perf_counter()
    window_frames = 0
    steps = -(-args.frames // args.frames_per_step)  # whole steps covering at least --frames
    for t in range(steps):
        try:
            step(t)
        except torch.OutOfMemoryError:
            stopped = "OOM"
            break
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a time limit (see run): keep what was measured
            stopped = "interrupted"
            if window_frames:
                _sync(args.device)
                now = time.perf_counter()
                samples.append((done, (now - window_start) / window_frames * 1e3, _memory(args.device)))
            break
        done += args.frames_per_step
        window_frames += args.frames_per_step
        last = t == steps - 1
        if window_frames >= args.sample_every or last:
            _sync(args.device)
            now = time.perf_counter()
            memory = _memory(args.device)
            samples.append((done, (now - window_start) / window_frames * 1e3, memory))
            print(f"  frames {done}: {samples[-1][1]:.2f} ms per frame, {memory:.2f} GiB", flush=True)
            window_start, window_frames = now, 0
            if time_limit is not None and now - start > time_limit and not last:
                stopped = f"time limit {time_limit:.0f} s"
                break
    _sync(args.device)
    return done, done / (time.perf_counter() - start), samples, _peak(args.device), stopped


def _memory(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> None:
    """Streams InfiniteVL, then the baseline. Ctrl-C or SIGTERM (``timeout``) ends the stream being measured: its
    row and the plot are still written from the frames done, and the baseline is skipped if it had not started."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.frames_per_step % FRAMES_PER_PATCH:
        raise ValueError(f"--frames-per-step must be even (whole temporal patches); got {args.frames_per_step}")
    tokens = (args.frame_size // 28) ** 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# {name} | torch {torch.__version__} | {dtype} | {datetime.date.today()} | frames {args.frame_size}px, "
        f"{tokens} tokens per {FRAMES_PER_PATCH} frames ({tokens // FRAMES_PER_PATCH} per frame), "
        f"{args.frames_per_step} frames per step\n"
    )
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm) if main else None
    results = {}
    try:
        # One model on the device at a time, so that each one's memory is its own.
        print("InfiniteVL:", flush=True)
        model = build_infinitevl(args.shapes, args.device, dtype)
        results["InfiniteVL"] = stream_infinitevl(model, args, dtype)
        del model
        if args.baseline and results["InfiniteVL"][4] != "interrupted":
            print("Qwen2.5-VL (sdpa):", flush=True)
            _reset(args.device)
            baseline = build_baseline(args.shapes, args.device, dtype)
            results["Qwen2.5-VL (sdpa)"] = stream_baseline(baseline, args, dtype)
    except KeyboardInterrupt:  # during start-up or warm-up: nothing of that model was measured
        print("  interrupted before its stream started", flush=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    print("\n| model | frames ingested | frames/s | first / last ms per frame | memory first / last GiB | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, result in results.items():
        _row(label, result)
    plot({label: r for label, r in results.items() if r[2]}, args.plot)
    print(f"\nplot: {args.plot}")


def _row(label, result) -> None:
    done, fps, samples, peak, stopped = result
    status = f" ({stopped})" if stopped else ""
    if samples:
        first, last = samples[0], samples[-1]
        print(
            f"| {label} | {done}{status} | {fps:.1f} | {first[1]:.1f} / {last[1]:.1f} | {first[2]:.2f} / "
            f"{last[2]:.2f} | {peak:.2f} |",
            flush=True,
        )
    else:
        print(f"| {label} | 0{status} | | | | |", flush=True)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, (_, _, samples, _, _) in results.items():
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
