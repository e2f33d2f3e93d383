"""Training throughput of the three stages: time per optimizer step, tokens/s per GPU, MFU and peak memory, for
InfiniteVL and for a Qwen2.5-3B-shaped Transformer (transformers, sdpa) trained the same way.

Every case runs the real stage module (``ivl.stages``) through Lightning's Trainer with ``FSDP2Strategy`` on
``--devices`` processes (one GPU each): bf16 compute over float32 master weights, AdamW, activation checkpointing
as ``--checkpointing`` says, the chunked head losses. The Transformer (``ivl.bench.baseline_stage``) goes through
the same Trainer, strategy, optimizer, checkpointing and losses. Weights are random (the 4B shapes, or the tiny ones
with ``--shapes tiny``); each step is one sequence of ``length`` text tokens per process; the first ``--warmup``
steps (compilation, autotuning) are not timed.

Cases: ``stage1-layerwise`` (teacher forward + the GDN blocks on the teacher's inputs, MSE), ``stage1-kl``
(teacher forward + student, KL at T = 2), ``stage2`` (full fine-tune of the language model), ``stage3`` (LoRA
r = 64 on every projection). Stage I trains the Gated DeltaNet mixers (the Transformer: the attention of the same
27 layers), with the teacher (Qwen2.5-VL-3B-shaped, bf16) resident on every GPU.

MFU: model FLOPs per step (``ivl.stages.flops``, recomputation excluded; Stage I adds the teacher's forward)
over the peak of 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import statistics
import traceback
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ivl.bench.baseline_stage import TransformerStage
from ivl.bench.gdn_core import head_width
from ivl.bench.hybrid_stages import BenchDistill, BenchInstruct, BenchLongContext
from ivl.bench.random_models import build_teacher, teacher_config
from ivl.bench.step_callbacks import StepProfiler, StepTimer, SyncCounter
from ivl.kernels import gated_delta
from ivl.stages import FSDP2Strategy
from ivl.stages.flops import hybrid_flops, transformer_flops

PEAK_FLOPS = 989e12
CASES = ("stage1-layerwise", "stage1-kl", "stage2", "stage3")
LENGTHS = {"stage1-layerwise": 8192, "stage1-kl": 8192, "stage2": 8192, "stage3": 32768}
TINY_LENGTHS = {"stage1-layerwise": 128, "stage1-kl": 128, "stage2": 128, "stage3": 512}


def checkpointing_mode(text: str) -> str | int | float:
    """--checkpointing's values: a name, an integer stride or a fraction of the blocks."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument(
        "--models", nargs="+", default=["infinitevl", "transformer"], choices=["infinitevl", "transformer"]
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="tokens per step and GPU (default: per case, " + ", ".join(f"{c} {n}" for c, n in LENGTHS.items()) + ")",
    )
    parser.add_argument("--devices", type=int, default=1, help="GPUs (FSDP2 processes)")
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        default=["blocks"],
        type=checkpointing_mode,
        help="activation checkpointing: off, blocks, mixers, every n-th block (an integer) or a "
        "share of the blocks (a fraction, 0.75); several values run one after another",
    )
    parser.add_argument(
        "--keep-gathered",
        action="store_true",
        help="FSDP2 reshard_after_forward=False: blocks stay gathered from forward to backward",
    )
    parser.add_argument(
        "--no-recompute-cheap",
        action="store_true",
        help="blocks whose activations are kept hold their cheap ones too (norm outputs, the SwiGLU "
        "product, convolution outputs) rather than recompute them in the backward",
    )
    parser.add_argument(
        "--sequences",
        type=int,
        default=1,
        help="sequences of --lengths tokens per step and GPU (InfiniteVL: packed, as the stages "
        "train; the Transformer: a batch)",
    )
    parser.add_argument(
        "--adamw",
        default="fused",
        choices=["fused", "foreach"],
        help="torch's AdamW implementation (the stages use fused on GPUs)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        help="Stage III's LoRA dropout (experiments/stage3_long.yaml trains with 0.05)",
    )
    parser.add_argument(
        "--value-head-width",
        type=head_width,
        default=gated_delta.VALUE_HEAD_WIDTH,
        help="run Gated DeltaNet's chunked rule with its value heads split into heads of this width "
        "(ivl.kernels.gated_delta.VALUE_HEAD_WIDTH; 128: FlashQLA's shape when installed)",
    )
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"], help="tiny: a CPU smoke run")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also profile one extra step per run: each rank's Chrome trace (gzipped) and a summary "
        "of where its GPU time went go into this folder",
    )


def synthetic_batches(case: str, model: str, length: int, vocab: int, count: int, sequences: int = 1) -> list[dict]:
    """``sequences`` text sequences of ``length`` tokens per step; the second half of each are answer tokens (the
    loss of stages II and III). InfiniteVL's stages II and III train on packed rows (one row, ``cu_seqlens``), the
    distillation stage and the Transformer on a batch of rows."""
    g = torch.Generator().manual_seed(0)
    packed = model == "infinitevl" and not case.startswith("stage1")
    batches = []
    for _ in range(count):
        ids = torch.randint(0, min(vocab, 150000), (sequences, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        if packed:
            ids, labels = ids.reshape(1, -1), labels.reshape(1, -1)
        batch = {"input_ids": ids, "labels": labels}
        if model == "infinitevl" and case.startswith("stage1"):
            batch["attention_mask"] = torch.ones_like(ids)  # the distillation stage's padded batches
        elif packed:
            batch.update(
                cu_seqlens=torch.arange(0, sequences + 1, dtype=torch.int32) * length,
                sources=["synthetic"] * sequences,
                tasks=[None] * sequences,
            )
        batches.append(batch)
    return batches


def build_module(case: str, model: str, args, teacher):
    window = 8192 if args.shapes == "4b" else 64
    common = dict(
        window=window,
        warmup_ratio=0.0,
        activation_checkpointing=args.checkpointing,
        reshard_after_forward=not args.keep_gathered,
        recompute_cheap=not args.no_recompute_cheap,
        param_dtype="bfloat16" if args.device == "cuda" else "float32",
    )
    fused = args.adamw == "fused" and args.device == "cuda"
    if model == "transformer":
        return TransformerStage(
            case,
            args.shapes,
            args.checkpointing,
            args.lora_r,
            teacher if case == "stage1-kl" else None,
            keep_gathered=args.keep_gathered,
            adamw_fused=fused,
            lora_dropout=args.lora_dropout,
            recompute_cheap=not args.no_recompute_cheap,
        )
    if case.startswith("stage1"):
        module = BenchDistill(teacher="bench", layerwise_steps=-1 if case == "stage1-layerwise" else 0, **common)
        module.__dict__["teacher"] = teacher
    elif case == "stage2":
        module = BenchInstruct(teacher="bench", **common)
    else:
        module = BenchLongContext(
            teacher="bench", lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout, **common
        )
    module.bench_shapes, module.adamw_fused = args.shapes, fused
    return module


def step_flops(case: str, model: str, module, teacher, length: int) -> float:
    """Model FLOPs of one step (``length`` tokens on one process)."""
    if model == "transformer":
        flops = transformer_flops(module.model.lm, length).total
    elif case == "stage1-layerwise":
        flops = hybrid_flops(module.model, length, blocks=module.linear_layers, head=False).total
    else:
        flops = hybrid_flops(module.model, length).total
    if case.startswith("stage1"):
        flops += transformer_flops(teacher, length, trained=False).forward
    return flops * length


def measure(case: str, model: str, length: int, args, teacher) -> dict:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    module = build_module(case, model, args, teacher)
    steps = args.warmup + args.steps
    timer = StepTimer(args.warmup, last=steps)
    syncs = SyncCounter(steps)
    callbacks = [timer, syncs]
    steps += args.device == "cuda"
    if args.profile is not None:
        tag = (
            f"{case}-{model}-{length}-{args.devices}gpu-ckpt{args.checkpointing}"
            + "-kept" * args.keep_gathered
            + "-holdcheap" * args.no_recompute_cheap
        )
        callbacks.append(StepProfiler(steps, args.profile, tag))
        steps += 1
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=args.devices,
        strategy=FSDP2Strategy(),
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    vocab = teacher_config(args.shapes).text_config.vocab_size
    data = DataLoader(synthetic_batches(case, model, length, vocab, steps, args.sequences), batch_size=None)
    row = dict(
        case=case,
        model=model,
        devices=args.devices,
        length=length,
        sequences=args.sequences,
        checkpointing=args.checkpointing,
        shapes=args.shapes,
        keep_gathered=args.keep_gathered,
        recompute_cheap=not args.no_recompute_cheap,
        adamw=args.adamw,
    )
    if case == "stage3" and args.lora_dropout:
        row["lora_dropout"] = args.lora_dropout
    if model == "infinitevl" and args.value_head_width:
        row["value_head_width"] = args.value_head_width
    try:
        trainer.fit(module, data)
    except torch.OutOfMemoryError:
        return {**row, "status": "OOM"}
    except Exception as error:  # report and go on with the next case
        traceback.print_exc()
        return {**row, "status": f"failed: {type(error).__name__}"}
    step = statistics.median(timer.times)
    tokens = length * args.sequences
    flops = step_flops(case, model, module, teacher, length) * args.sequences
    return {
        **row,
        "status": "ok",
        "step_s": step,
        "tokens_per_s_per_gpu": tokens / step,
        "mfu": flops / step / PEAK_FLOPS,
        "peak_gib": timer.peak_gib,
        "host_syncs": syncs.origins,
        "trainable": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
    }


def run(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "ivl.bench train times GPU steps; no CUDA device is visible (--shapes tiny --device cpu for a smoke run)"
        )
    gated_delta.VALUE_HEAD_WIDTH = args.value_head_width  # every rank parses the same arguments
    rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    rows = []
    teacher = None
    for case in args.cases:
        if case.startswith("stage1") and teacher is None:
            teacher = build_teacher(args.shapes, device)
        for length in args.lengths or [(LENGTHS if args.shapes == "4b" else TINY_LENGTHS)[case]]:
            for model, checkpointing in itertools.product(args.models, args.checkpointing):
                if model == "transformer" and case == "stage1-layerwise":
                    continue  # the layer-wise phase distils mixers into new mixers: no Transformer analogue
                one = argparse.Namespace(**{**vars(args), "checkpointing": checkpointing})
                row = measure(case, model, length, one, teacher)
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(
                                json.dumps({**row, "date": str(datetime.date.today()), "device": _device_name(args)})
                                + "\n"
                            )
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    if rank == 0:
        print(table(rows, _device_name(args)))
    if torch.distributed.is_initialized():  # set up by the Trainer's strategy, which leaves it
        torch.distributed.destroy_process_group()


def _device_name(args) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else "cpu"


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"\n# {device} | torch {torch.__version__} | {datetime.date.today()}\n",
        "| case | model | GPUs | tokens | checkpointing | AdamW | s/step | tokens/s/GPU | MFU | peak GiB | "
        "host waits/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        tokens = f"{r['length']}" + (f" x {r['sequences']}" if r.get("sequences", 1) > 1 else "")
        head = (
            f"| {r['case']} | {r['model']} | {r['devices']} | {tokens} | {r['checkpointing']}"
            f"{', kept gathered' if r.get('keep_gathered') else ''}"
            f"{', cheap ones held' if r.get('recompute_cheap') is False else ''}"
            f"{f', LoRA dropout {d}' if (d := r.get('lora_dropout')) else ''}"
            f"{f', value heads of {w}' if (w := r.get('value_head_width')) else ''} | {r.get('adamw', '')} |"
        )
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | |")
            continue
        waits = r.get("host_syncs")
        lines.append(
            f"{head} {r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
            f"{r['peak_gib']:.1f} | {'-' if waits is None else len(waits)} |"
        )
    return "\n".join(lines)
