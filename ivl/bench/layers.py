"""Forward and forward+backward time of one token-mixing layer (the linear mixers, SWA, full attention) at 4B shapes.

Times one mixer layer of the `infinitevl-4b` preset (hidden 2048) on a [1, T, 2048] input, with CUDA events,
after warm-up (which also absorbs FlexAttention's compilation), as the median of several repeats. ``conv`` and
``conv-fla`` time a Gated DeltaNet layer's short convolution over its q, k and v channels at once (as Stage II runs
it), with ivl's backward kernel and with fla's. ``gdn-core`` times the gated delta rule alone by implementation
(fla; value heads of 128, which fla hands to FlashQLA; FlashQLA without its intra-card split; FlashInfer;
``ivl.bench.gdn_core``).
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

import ivl.kernels.gated_delta as gated_delta
from ivl.bench import gdn_core
from ivl.model import HybridConfig
from ivl.model.layers import MultimodalRotaryEmbedding
from ivl.model.mixers import ALIASES, LINEAR_MIXERS, canonical_name, mixer_class
from ivl.model.mixers.attention import SlidingWindowAttention
from ivl.model.mixers.short_convolution import short_convolution


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--preset", default="infinitevl-4b")
    parser.add_argument(
        "--mixers",
        nargs="+",
        default=["gated_deltanet", "swa", "full"],
        choices=[*LINEAR_MIXERS, *ALIASES, "swa", "full", "conv", "conv-fla", "gdn-core"],
    )
    parser.add_argument(
        "--value-head-width",
        type=gdn_core.head_width,
        default=None,
        help="run Gated DeltaNet's value heads as heads of this width (128: FlashQLA's shape when installed)",
    )
    parser.add_argument(
        "--conv-channels",
        type=int,
        nargs="+",
        default=None,
        help="channels of the conv rows (default: a Gated DeltaNet layer's q, k and v at once)",
    )


class QKVConvolution(torch.nn.Module):
    """A Gated DeltaNet layer's q, k and v short convolution (with SiLU) as one call, as training runs it."""

    def __init__(self, config: HybridConfig, fla_backward: bool, channels: int | None = None):
        super().__init__()
        heads, k, v = config.linear_num_heads, config.linear_head_k_dim, config.linear_head_v_dim
        self.in_features = channels or (2 * k + v) * heads
        self.weight = torch.nn.Parameter(torch.randn(self.in_features, config.linear_conv_size) / 2)
        self.fla_backward = fla_backward

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        if self.fla_backward:
            from ivl.kernels._fla import fla_causal_conv1d

            return fla_causal_conv1d()(x, weight=self.weight, activation="silu")[0]
        return short_convolution(x, self.weight)[0]


def time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ivl.bench layers times GPU kernels; no CUDA device is visible")
    dtype = getattr(torch, args.dtype)
    config = HybridConfig.preset(args.preset)
    builders = {
        **{kind: (mixer_class(kind).label, lambda kind=kind: mixer_class(kind)(config, 1)) for kind in LINEAR_MIXERS},
        "swa": (f"SWA (window {config.window})", lambda: SlidingWindowAttention(config, 0)),
        "full": ("full attention", lambda: SlidingWindowAttention(HybridConfig.preset(args.preset, window=None), 0)),
    }
    gated_delta.VALUE_HEAD_WIDTH = args.value_head_width
    mixers = {}
    for m in args.mixers:
        if m == "gdn-core":
            continue
        if m not in ("conv", "conv-fla"):
            label, build = builders[canonical_name(m) if m in ALIASES else m]
            mixers[label] = build()
            continue
        for channels in args.conv_channels or [None]:
            width = f"{channels:,} channels" if channels else "q, k, v"
            whose = "fla's" if m == "conv-fla" else "ivl's"
            mixers[f"short convolution ({width}), {whose} backward"] = QKVConvolution(config, m == "conv-fla", channels)
    rotary = MultimodalRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section).cuda()
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.dtype} | "
        f"{datetime.date.today()} | hidden {config.hidden_size}, batch 1\n"
    )
    print("| layer | " + " | ".join(f"{t // 1024}K fwd / fwd+bwd (ms)" for t in args.lengths) + " |")
    print("| --- |" + " --- |" * len(args.lengths))
    for name, layer in mixers.items():
        layer = layer.to("cuda", dtype)
        cells = []
        for T in args.lengths:
            width = getattr(layer, "in_features", config.hidden_size)
            x = torch.randn(1, T, width, device="cuda", dtype=dtype, requires_grad=True)
            pos = torch.arange(T, device="cuda")[None, None].expand(3, 1, -1)
            rope = rotary(pos, dtype)
            grad = torch.randn_like(x)

            def forward():
                with torch.no_grad():
                    layer(x, rope=rope)

            def forward_backward():
                layer(x, rope=rope).backward(grad)

            try:
                cells.append(f"{time_ms(forward, args.repeats):.2f} / {time_ms(forward_backward, args.repeats):.2f}")
            except torch.OutOfMemoryError:
                cells.append("OOM")
            layer.zero_grad(set_to_none=True)
            x.grad = None
            torch.cuda.empty_cache()
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if "gdn-core" in args.mixers:
        gdn_core.run(config, args.lengths, dtype, args.repeats, time_ms)
