"""InfiniteVL vs a Transformer VLM (Qwen2.5-VL, transformers, sdpa): prefill time, per-token decode latency and
peak memory across context lengths, random weights, with a roofline for decoding.

Both models carry their vision tower; prompts are text so that context length is exact. InfiniteVL prefills in
chunks through its constant-memory cache and decodes with the chosen decoder ("cuda_graph" by default); the
baseline prefills in one call and decodes with its growing KV cache, as users run it. A context at which a model
runs out of memory is reported as OOM and the model is not tried on longer ones.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.bench.convert import QWEN2_5_VL_3B
from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig
from ivl.model.generation import _static_step
from ivl.model.vision import vision_config_dict
from ivl.stages.models import TINY_TEACHER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--decoder", default="cuda_graph", choices=["dynamic", "static", "cuda_graph"])
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"], help="tiny: a CPU smoke run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/inference.png"))


def build(shapes: str, device: str, dtype: torch.dtype):
    teacher_config = Qwen2_5_VLConfig(**(QWEN2_5_VL_3B if shapes == "4b" else TINY_TEACHER))
    with torch.device(device):
        baseline = Qwen2_5_VLForConditionalGeneration._from_config(teacher_config, dtype=dtype,
                                                                    attn_implementation="sdpa").eval()
        text = HybridConfig.preset("infinitevl-4b") if shapes == "4b" else HybridConfig.tiny(
            vocab_size=151936, hidden_size=64, window=256)
        model = InfiniteVL(InfiniteVLConfig(text=text, vision=vision_config_dict(teacher_config.vision_config)))
    return model.to(dtype).eval(), baseline


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def _reset(device):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def time_infinitevl(model, B, T, args):
    lm, device = model.lm, args.device
    ids = torch.randint(0, 150000, (B, T), device=device)
    _reset(device)
    _sync(device)
    start = time.perf_counter()
    cache = lm.new_cache()
    for a in range(0, T, args.prefill_chunk):
        hidden = lm.hidden_states(ids[:, a:a + args.prefill_chunk], cache=cache)
    logits = lm.lm_head(hidden[:, -1])
    _sync(device)
    prefill = time.perf_counter() - start
    if args.decoder == "dynamic":
        def step(tok, pos, i):
            return lm(tok[:, None], position_ids=pos, cache=cache)[:, -1]
    else:
        step = _static_step(lm, cache, B, T, args.decoder, ids.device)
    token = logits.argmax(-1)
    times = []
    for s in range(args.decode_tokens):
        pos = torch.full((3, B, 1), T + s, device=device)
        _sync(device)
        t0 = time.perf_counter()
        token = step(token, pos, T + s).argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    decode = sorted(times[2:] or times)[len(times[2:] or times) // 2]
    return prefill, decode, _peak(device)


@torch.no_grad()
def time_baseline(model, B, T, args):
    device = args.device
    ids = torch.randint(0, 150000, (B, T), device=device)
    _reset(device)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    times = []
    for s in range(args.decode_tokens):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    decode = sorted(times[2:] or times)[len(times[2:] or times) // 2]
    return prefill, decode, _peak(device)


def hbm_bandwidth(device: str) -> float:
    """Measured device-memory bandwidth in bytes/s (a 2 GiB copy), for the decode roofline."""
    if not device.startswith("cuda"):
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, baseline = build(args.shapes, args.device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.lm.parameters())
    bandwidth = hbm_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# {name} | torch {torch.__version__} | {dtype} | {datetime.date.today()} | decoder {args.decoder}\n")
    print("| model | batch | context | prefill s | decode ms/token | peak GiB | decode roofline ms (fraction) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for label, fn, net in (("InfiniteVL", time_infinitevl, model), ("Qwen2.5-VL (sdpa)", time_baseline, baseline)):
        for B in args.batch:
            for T in args.contexts:
                try:
                    prefill, decode, peak = fn(net, B, T, args)
                except torch.OutOfMemoryError:
                    print(f"| {label} | {B} | {T} | OOM | OOM | OOM | |", flush=True)
                    rows.append((label, B, T, None, None, None))
                    break
                roofline = ""
                if label == "InfiniteVL" and bandwidth == bandwidth:
                    bound = (weight_bytes + _state_bytes(model, B)) / bandwidth
                    roofline = f"{bound * 1e3:.2f} ({bound / decode:.0%})"
                print(f"| {label} | {B} | {T} | {prefill:.3f} | {decode * 1e3:.2f} | {peak:.2f} | {roofline} |",
                      flush=True)
                rows.append((label, B, T, prefill, decode, peak))
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


def _state_bytes(model: InfiniteVL, B: int) -> int:
    """Bytes a decode step reads besides the weights: full attention rings and GDN states (at the window)."""
    text = model.config.text
    total = 0
    for kind in text.layer_types:
        if kind == "attention":
            total += 2 * B * text.window * text.num_key_value_heads * text.head_dim * 2
        else:
            total += B * text.gdn_num_heads * text.gdn_head_k_dim * text.gdn_head_v_dim * 4
    return total


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (label, B), marker in zip(sorted({(r[0], r[1]) for r in rows}), "osd^v<>"):
        done = [r for r in rows if r[0] == label and r[1] == B and r[3] is not None]
        if not done:
            continue
        x = [r[2] for r in done]
        for ax, i, scale in zip(axes, (3, 4, 5), (1, 1e3, 1)):
            ax.plot(x, [r[i] * scale for r in done], marker=marker, label=f"{label}, batch {B}")
    for ax, title in zip(axes, ("prefill (s)", "decode (ms / token)", "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
