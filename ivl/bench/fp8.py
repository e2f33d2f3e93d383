"""The prefill's matrix products in FP8 against bf16: what FP8 could save (GPU) and what it costs (``--accuracy``).

Speed, on a GPU: every weight a prefill chunk multiplies (each mixer's projections, the MLPs; the LM head runs on
one row) is timed over a chunk of tokens as ``F.linear`` in bf16 and as ``torch._scaled_mm`` in float8 e4m3 with
row-wise scales (per token for the activations, per output channel for the weights, both computed in float32), the
activations' quantisation included and the weights quantised once beforehand. Also printed: the relative error of
each FP8 product against the bf16 one on random inputs (a model's activations have outliers that random data
lacks, so this is a floor, not the accuracy on a real model).

Accuracy (``--accuracy``, on the CPU, where torch runs the same row-wise ``torch._scaled_mm``): a real pretrained
model converted into ivl's model code (SmolLM2-135M-Instruct as a Qwen2.5-VL-shaped teacher, converted with every
layer kept as attention, so that it answers as the pretrained model does) prefills chat prompts with every product
of its blocks in FP8 (the LM head stays bf16) and then decodes greedily in bf16, as an FP8 prefill would be used;
printed per prompt: the prefill logits' relative error against bf16's (and bf16's own against float32, for scale)
and whether the greedy answer is the bf16 one (and, for scale, whether bf16's is float32's). ``--scales`` picks
the scaling: ``row`` (per token, per output channel), ``block`` (activations per token and 128 columns, weights per
128 x 128 block: DeepSeek-V3's recipe) or ``tile`` (both per row and 128 columns). The block-wise ones multiply the
e4m3 operands, dequantised, in float32: what the tensor cores compute up to the accumulator's rounding (on the
CPU torch's scaled products take tensor- and row-wise scales only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime

import torch
import torch.nn.functional as F

from ivl.bench.gemv import decode_shapes, graph_time_ms
from ivl.model import HybridConfig

E4M3_MAX = 448.0

BLOCKS = {"row": None, "block": ((1, 128), (128, 128)), "tile": ((1, 128), (1, 128))}
"""--scales: the (rows, columns) that share one scale, for the activations and the weights (None: row-wise)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="infinitevl-4b")
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the activations: one prefill chunk")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--accuracy", action="store_true", help="the accuracy check on the CPU instead of timings")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt (--accuracy)")
    parser.add_argument("--scales", default="row", choices=list(BLOCKS), help="FP8 scaling (--accuracy)")


PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence what a sliding window attention layer does.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~ e4m3 * scale."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def round_blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x [M, K] rounded to e4m3 with one scale per ``rows`` x ``cols`` block (edge blocks smaller), back in
    float32."""
    M, K = x.shape
    padded = F.pad(x.float(), (0, -K % cols, 0, -M % rows))
    blocks = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / E4M3_MAX
    rounded = (blocks / scale).to(torch.float8_e4m3fn).float() * scale
    return rounded.view(padded.shape)[:M, :K]


@contextlib.contextmanager
def fp8_products(scales: str = "row"):
    """Inside: every ``F.linear`` whose weight has both sides a multiple of 16 runs in e4m3 (each weight quantised
    once): row-wise as ``torch._scaled_mm``, block-wise (``BLOCKS``) as a float32 product of the rounded operands."""
    original = F.linear
    weights: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def linear(x, weight, bias=None):
        N, K = weight.shape
        if N % 16 or K % 16:
            return original(x, weight, bias)
        key = (weight.data_ptr(), N, K, weight._version)
        if key not in weights:
            weights[key] = quantize_rows(weight) if scales == "row" else (round_blocks(weight, *BLOCKS[scales][1]),)
        if scales == "row":
            w8, w_scale = weights[key]
            x8, x_scale = quantize_rows(x.reshape(-1, K))
            y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=x.dtype)
        else:
            y = (round_blocks(x.reshape(-1, K), *BLOCKS[scales][0]) @ weights[key][0].t()).to(x.dtype)
        return (y if bias is None else y + bias).view(*x.shape[:-1], N)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


@torch.no_grad()
def _answer(lm, ids: torch.Tensor, new_tokens: int, stop: set[int], fp8: str | None) -> tuple[torch.Tensor, list[int]]:
    """Prefill logits [T, vocab] (float32) and the greedy answer's token ids; the prefill's block products in FP8
    with ``fp8`` scales (None: not), the LM head and every decode step as the model's dtype."""
    cache = lm.new_cache()
    with fp8_products(fp8) if fp8 else contextlib.nullcontext():
        hidden = lm.hidden_states(ids, cache=cache)
    logits = lm.lm_head(hidden)[0].float()
    answer = [int(logits[-1].argmax())]
    while len(answer) < new_tokens and answer[-1] not in stop:
        step = lm(torch.tensor([[answer[-1]]]), cache=cache)[0, -1]
        answer.append(int(step.argmax()))
    return logits, answer


def accuracy(args: argparse.Namespace) -> None:
    from ivl.model import convert_qwen2_5_vl
    from ivl.teachers.llama import llama_as_qwen2_5_vl, load_llama, smollm2_gguf

    torch.manual_seed(0)
    llama, tokenizer = load_llama(smollm2_gguf())
    teacher, tokenizer = llama_as_qwen2_5_vl(llama, tokenizer)
    exact, _ = convert_qwen2_5_vl(teacher, hybrid_ratio=1.0, window=None, dtype=torch.float32)
    exact = exact.lm.eval()
    model, _ = convert_qwen2_5_vl(teacher, hybrid_ratio=1.0, window=None, dtype=torch.bfloat16)
    model = model.lm.eval()
    stop = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    print(
        f"# {datetime.date.today()} CPU torch {torch.__version__}: SmolLM2-135M-Instruct converted (all attention), "
        f"prefill products in e4m3 ({args.scales} scales) against bf16, greedy {args.new_tokens} tokens"
    )
    print(
        "| prompt | tokens | FP8 vs bf16 logits | bf16 vs float32 logits | FP8's answer is bf16's "
        "| bf16's answer is float32's | answer (bf16) |"
    )
    print("|---|---|---|---|---|---|---|")
    same = same_bf16 = 0
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt").input_ids
        reference, answer = _answer(model, ids, args.new_tokens, stop, fp8=None)
        quantized, fp8_answer = _answer(model, ids, args.new_tokens, stop, fp8=args.scales)
        full = exact.lm_head(exact.hidden_states(ids))[0].float()
        _, exact_answer = _answer(exact, ids, args.new_tokens, stop, fp8=None)
        fp8_err = ((quantized - reference).norm() / reference.norm()).item()
        bf16_err = ((reference - full).norm() / full.norm()).item()
        same += answer == fp8_answer
        same_bf16 += answer == exact_answer
        shown = tokenizer.decode(answer, skip_special_tokens=True).replace("\n", " ").replace("|", "/")[:60]
        print(
            f"| {prompt} | {ids.shape[1]} | {fp8_err:.2e} | {bf16_err:.2e} | {'yes' if answer == fp8_answer else 'no'} "
            f"| {'yes' if answer == exact_answer else 'no'} | {shown} |",
            flush=True,
        )
    print(f"\nFP8's greedy answer is bf16's: {same} of {len(PROMPTS)} (bf16's is float32's: {same_bf16})")


def run(args: argparse.Namespace) -> None:
    if args.accuracy:
        return accuracy(args)
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
