"""InfiniteVL vs a Transformer VLM (Qwen2.5-VL, transformers, sdpa): prefill time, per-token decode latency and
peak memory across context lengths, random weights, with a roofline for decoding.

Both models carry their vision tower; prompts are text so that context length is exact. InfiniteVL prefills in
chunks through its constant-memory cache and decodes with the chosen decoder ("cuda_graph" by default). The
baseline prefills in one call and decodes twice: as users run it (eager, growing KV cache) and at its best
(preallocated KV buffers, the step captured in a CUDA graph). A context at which a model runs out of memory is
reported as OOM and the model is not tried on longer ones.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.bench.gdn_core import head_width
from ivl.bench.hf_cache import cache_of, with_cache
from ivl.kernels import gated_delta, window_attention
from ivl.kernels.value_heads import splits
from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig
from ivl.model.decoding.generation import SlotDecoder
from ivl.model.decoding.prefill_graph import PrefillGraphs
from ivl.model.mixers import LINEAR_MIXERS
from ivl.model.vision import vision_config_dict
from ivl.teachers.qwen2_5_vl import QWEN2_5_VL_3B, TINY_TEACHER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1 << 20,
        help="skip batch x context beyond this many prompt tokens (batch 8 stops at 128K)",
    )
    parser.add_argument(
        "--baseline-max-context",
        type=int,
        default=131072,
        help="longest context tried on the baseline (its prefill is quadratic)",
    )
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--decoder", default="cuda_graph", choices=["dynamic", "static", "cuda_graph"])
    parser.add_argument(
        "--decode-kernel",
        nargs="+",
        default=[window_attention.DECODE_KERNEL],
        choices=["matmul", "split", "auto"],
        help="how a decode step reads the attention ring (ivl.kernels.window_attention.DECODE_KERNEL); several "
        "values: one row each, on the same machine",
    )
    parser.add_argument(
        "--value-head-width",
        type=head_width,
        nargs="+",
        default=[gated_delta.VALUE_HEAD_WIDTH],
        help="run Gated DeltaNet's chunked rule with its value heads split into heads of this width "
        "(ivl.kernels.gated_delta.VALUE_HEAD_WIDTH; 128: FlashQLA's shape when installed); several values: one row "
        "each, on the same machine",
    )
    parser.add_argument(
        "--prefill",
        nargs="+",
        default=["eager"],
        choices=["eager", "cuda_graph"],
        help="cuda_graph: chunks over a full window replay a captured graph (ivl.model.decoding.prefill_graph; "
        "no faster at 8,192-token chunks, see docs/benchmarks.md); several values: one row each",
    )
    parser.add_argument(
        "--linear-mixers",
        nargs="+",
        default=["gated_deltanet"],
        choices=list(LINEAR_MIXERS),
        help="InfiniteVL's non-attention layers; several values time one model after another",
    )
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"], help="tiny: a CPU smoke run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/inference.png"))


def _teacher_config(shapes: str) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(**(QWEN2_5_VL_3B if shapes == "4b" else TINY_TEACHER))


def build_infinitevl(shapes: str, device: str, dtype: torch.dtype, linear_mixer: str = "gated_deltanet") -> InfiniteVL:
    text = (
        HybridConfig.preset("infinitevl-4b", linear_mixer=linear_mixer)
        if shapes == "4b"
        else HybridConfig.tiny(vocab_size=151936, hidden_size=64, window=256, linear_mixer=linear_mixer)
    )
    vision = vision_config_dict(_teacher_config(shapes).vision_config)
    with torch.device(device):
        model = InfiniteVL(InfiniteVLConfig(text=text, vision=vision))
    return model.to(dtype).eval()


def build_baseline(shapes: str, device: str, dtype: torch.dtype):
    """transformers' Qwen2.5-VL with the teacher's shapes (3B by default), sdpa attention."""
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(
            _teacher_config(shapes), dtype=dtype, attn_implementation="sdpa"
        ).eval()


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
    graphs = PrefillGraphs(lm) if args.prefill == "cuda_graph" else None

    def prefill(cache, a, ids=ids):
        chunk = ids[:, a : a + args.prefill_chunk]
        if graphs is None:
            return lm.hidden_states(chunk, cache=cache)
        positions = torch.arange(a, a + chunk.shape[1], device=device).expand(3, B, -1)
        return graphs(cache, lm.embed_tokens(chunk), positions)

    # Untimed: compile and autotune for this batch's chunk shapes (a first chunk, then ones over a cached window),
    # and capture the graph of a chunk over a full window.
    # (A prompt of its own: the window and two chunks over it, whatever the timed context, so that no capture is
    # left to the timed run.)
    warm, warm_ids = lm.new_cache(), ids[:, :0].new_zeros(B, (lm.config.window or 0) + 2 * args.prefill_chunk)
    for a in range(0, warm_ids.shape[1], args.prefill_chunk):
        prefill(warm, a, warm_ids)
    del warm
    _reset(device)
    _sync(device)
    start = time.perf_counter()
    cache = lm.new_cache()
    for a in range(0, T, args.prefill_chunk):
        hidden = prefill(cache, a)
    logits = lm.lm_head(hidden[:, -1])
    _sync(device)
    prefill = time.perf_counter() - start
    if args.decoder == "dynamic":

        def step(tok, pos, i):
            return lm(tok[:, None], position_ids=pos, cache=cache)[:, -1]
    else:
        # The serving engine's decoder: B slots, each loaded with its row of the prefilled cache.
        slots = SlotDecoder(lm, B, cuda_graph=args.decoder == "cuda_graph")
        for b in range(B):
            slots.pool.load(b, cache.select_rows(torch.tensor([b], device=device)))

        def step(tok, pos, i):
            return slots(tok.tolist(), [i] * B, [i] * B)

    token = logits.argmax(-1)
    times = []
    for s in range(args.decode_tokens):
        pos = torch.full((3, B, 1), T + s, device=device)
        _sync(device)
        t0 = time.perf_counter()
        token = step(token, pos, T + s).argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return prefill, _median(times), _peak(device)


@torch.no_grad()
def time_baseline(model, B, T, args):
    """(prefill s, eager decode s/token, eager peak GiB, CUDA-graph decode s/token, its peak GiB)."""
    device = args.device
    ids = torch.randint(0, 150000, (B, T), device=device)
    model(input_ids=ids[:, :256], use_cache=True, logits_to_keep=1)  # cuBLAS/cuDNN start-up, untimed
    _reset(device)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - start
    past, token = cache_of(out), out.logits[:, -1].argmax(-1)
    first = token
    times = []
    for _ in range(args.decode_tokens):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=token[:, None], **with_cache(past), use_cache=True)
        past, token = cache_of(out), out.logits[:, -1].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    eager, eager_peak = _median(times), _peak(device)
    if not device.startswith("cuda"):
        return prefill, eager, eager_peak, float("nan"), float("nan")
    # Back to the prefilled state (the eager steps appended to the cache), then the best decoder.
    for layer in past.layers:
        layer.keys, layer.values = layer.keys[:, :, :T], layer.values[:, :, :T]
    del out
    try:
        step = BaselineStaticDecoder(model, past, T, T + args.decode_tokens, cuda_graph=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # a transformers release whose step cannot be captured: report, go on
        print(f"baseline CUDA-graph decoder unavailable: {type(error).__name__}: {error}", flush=True)
        return prefill, eager, eager_peak, float("nan"), float("nan")
    del past
    _reset(device)
    token, times = first, []
    for s in range(args.decode_tokens):
        _sync(device)
        t0 = time.perf_counter()
        token = step(token, T + s).argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return prefill, eager, eager_peak, _median(times), _peak(device)


def _median(times):
    times = times[2:] or times  # the first steps pay for allocations and warm-up
    return sorted(times)[len(times) // 2]


class _StaticKV:
    """Keys/values of every layer preallocated to [B, Hkv, max_len, D] and written at the token index held in a
    tensor: transformers' StaticCache, in a form whose index lives on the GPU so that a captured step can be
    replayed at every position (StaticCache's bookkeeping differs between transformers 5.x releases)."""

    def __init__(self, dynamic_cache, max_len: int):
        self.keys, self.values = [], []
        for layer in dynamic_cache.layers:
            for name, store in (("keys", self.keys), ("values", self.values)):
                t = getattr(layer, name)
                buffer = t.new_zeros(*t.shape[:2], max_len, t.shape[-1])
                buffer[:, :, : t.shape[2]] = t
                store.append(buffer)
        self.index = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.index, key_states)
        self.values[layer_idx].index_copy_(2, self.index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class BaselineStaticDecoder:
    """The Transformer baseline's decode step at its best: transformers' own language model and LM head over
    preallocated KV buffers with an explicit mask (no per-step reallocation), optionally captured once in a CUDA
    graph and replayed per token. Called as step(token [B], index) -> logits [B, vocab] for the token at
    ``index`` (its position too: text tokens)."""

    def __init__(self, model, dynamic_cache, T: int, max_len: int, cuda_graph: bool):
        self.model, self.text = model, model.model.language_model
        self.kv = _StaticKV(dynamic_cache, max_len)
        B, device = self.kv.keys[0].shape[0], self.kv.keys[0].device
        self.mask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=device)
        self.mask[..., :T] = True
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.position = torch.zeros(3, B, 1, dtype=torch.long, device=device)
        self.graph = None
        self.kv.index.fill_(T)
        if cuda_graph:
            # Warm-up writes at index T, which the first real step overwrites.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()

    def _forward(self):
        self.mask.index_fill_(3, self.kv.index, True)
        masks = {kind: self.mask for kind in set(self.text.config.layer_types)}
        hidden = self.text(
            input_ids=self.token[:, None],
            position_ids=self.position,
            attention_mask=masks,
            **with_cache(self.kv),
            use_cache=True,
        ).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, index: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.fill_(index)
        self.kv.index.fill_(index)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits.clone()


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
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    widths = ", ".join(str(w) if w else "as built" for w in args.value_head_width)
    print(
        f"# {name} | torch {torch.__version__} | {dtype} | {datetime.date.today()} | decoder {args.decoder} | "
        f"Gated DeltaNet value heads: {widths}\n"
    )
    # The dynamic decoder reads the cache through attention_at_positions, not through a ring kernel.
    kernels = args.decode_kernel if args.decoder != "dynamic" else args.decode_kernel[:1]
    variants = list(itertools.product(args.prefill, kernels, args.value_head_width))
    print("| model | batch | context | prefill s | decode ms/token | peak GiB | decode roofline ms (fraction) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    bandwidth = hbm_bandwidth(args.device)

    def report(label, B, T, prefill, decode, peak, roofline=""):
        print(f"| {label} | {B} | {T} | {prefill:.3f} | {decode * 1e3:.2f} | {peak:.2f} | {roofline} |", flush=True)
        rows.append((label, B, T, prefill, decode, peak))
        plot(rows, args.plot)  # after every row, so that a run cut short still leaves its plot

    for mixer in args.linear_mixers:
        label = "InfiniteVL" if args.linear_mixers == ["gated_deltanet"] else f"InfiniteVL ({mixer})"
        model = build_infinitevl(args.shapes, args.device, dtype, mixer)  # alone on the device: its peak is its own
        weight_bytes = sum(p.numel() * p.element_size() for p in model.lm.parameters())
        state_bytes = {B: _state_bytes(model, B) for B in args.batch}
        for B, (prefill_mode, kernel, width) in itertools.product(args.batch, variants):
            window_attention.DECODE_KERNEL = kernel  # read when the decode step compiles (a guard: it recompiles)
            gated_delta.VALUE_HEAD_WIDTH = width
            run_args = argparse.Namespace(**{**vars(args), "prefill": prefill_mode})
            if mixer != "gated_deltanet":
                heads = "no value heads to split"  # VALUE_HEAD_WIDTH acts on Gated DeltaNet alone
            elif splits(model.lm.config.linear_head_v_dim, width):
                heads = f"value heads of {width}"
            else:
                heads = "value heads as built"
            name = label if len(variants) == 1 else f"{label} (prefill {prefill_mode}, ring {kernel}, {heads})"
            for T in [t for t in args.contexts if B * t <= args.max_batch_tokens]:
                try:
                    prefill, decode, peak = time_infinitevl(model, B, T, run_args)
                except torch.OutOfMemoryError:
                    print(f"| {name} | {B} | {T} | OOM | OOM | OOM | |", flush=True)
                    break
                roofline = ""
                if bandwidth == bandwidth:
                    bound = (weight_bytes + state_bytes[B]) / bandwidth
                    roofline = f"{bound * 1e3:.2f} ({bound / decode:.0%})"
                report(name, B, T, prefill, decode, peak, roofline)
        del model
        _reset(args.device)
    if args.baseline_max_context <= 0:
        print(f"\nplot: {args.plot}")
        return
    baseline = build_baseline(args.shapes, args.device, dtype)
    # Bytes a step reads: the language model and LM head, a tied embedding counted once (one row is looked up).
    read = {p.data_ptr(): p for p in [*baseline.model.language_model.parameters(), baseline.lm_head.weight]}
    baseline_weight_bytes = sum(p.numel() * p.element_size() for p in read.values())
    for B in args.batch:
        for T in [t for t in args.contexts if B * t <= args.max_batch_tokens and t <= args.baseline_max_context]:
            try:
                prefill, eager, eager_peak, graph, graph_peak = time_baseline(baseline, B, T, args)
            except torch.OutOfMemoryError:
                print(f"| Qwen2.5-VL (sdpa) | {B} | {T} | OOM | OOM | OOM | |", flush=True)
                break
            roofline = ""
            if bandwidth == bandwidth:  # a Transformer's decode also reads its whole KV cache
                bound = (baseline_weight_bytes + _kv_bytes(baseline, B, T)) / bandwidth
                roofline = f"{bound * 1e3:.2f} ({bound / graph:.0%})" if graph == graph else f"{bound * 1e3:.2f}"
            report("Qwen2.5-VL (sdpa, eager)", B, T, prefill, eager, eager_peak)
            if graph == graph:
                report("Qwen2.5-VL (sdpa, static KV + CUDA graph)", B, T, prefill, graph, graph_peak, roofline)
    print(f"\nplot: {args.plot}")


def _state_bytes(model: InfiniteVL, B: int) -> int:
    """Bytes a decode step reads besides the weights: full attention rings and linear-mixer states (at the window)."""
    text = model.config.text
    total = 0
    for kind, block in zip(text.layer_types, model.lm.layers):
        if kind == "attention":
            total += 2 * B * text.window * text.num_key_value_heads * text.head_dim * 2
        else:
            total += B * torch.Size(block.mixer.state_shape()).numel() * 4
    return total


def _kv_bytes(baseline, B: int, T: int) -> int:
    """Bytes of the baseline's KV cache at context T (bf16 keys and values of every layer)."""
    text = baseline.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * B * T * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (label, B), marker in zip(sorted({(r[0], r[1]) for r in rows}), itertools.cycle("osd^v<>")):
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
