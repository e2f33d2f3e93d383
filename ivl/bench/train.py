"""Training throughput of the three stages: time per optimizer step, tokens/s per GPU, MFU and peak memory, for
InfiniteVL and for a Qwen2.5-3B-shaped Transformer (transformers, sdpa) trained the same way.

Every case runs the real stage module (``ivl.stages``) through Lightning's Trainer with ``FSDP2Strategy`` on
``--devices`` processes (one GPU each): bf16 compute over float32 master weights, AdamW, activation checkpointing
as ``--checkpointing`` says, the chunked head losses. The Transformer goes through the same Trainer, strategy,
optimizer, checkpointing and losses. Weights are random (the 4B shapes, or the tiny ones with ``--shapes tiny``);
each step is one sequence of ``length`` text tokens per process; the first ``--warmup`` steps (compilation,
autotuning) are not timed.

Cases: ``stage1-layerwise`` (teacher forward + the GDN blocks on the teacher's inputs, MSE), ``stage1-kl``
(teacher forward + student, KL at T = 2), ``stage2`` (full fine-tune of the language model), ``stage3`` (LoRA
r = 64 on every projection). Stage I trains the Gated DeltaNet mixers (the Transformer: the attention of the same
27 layers), with the teacher (Qwen2.5-VL-3B-shaped, bf16) resident on every GPU.

MFU counts model FLOPs per token, recomputation excluded: forward 2 N_run + the mixers' cores; backward
2 N_run (input gradients through every product that ran) + 2 N_trainable (weight gradients) + twice the cores'
forward. N are matrix parameters (the tied head counted once, as the head); the attention core is
4 H D c per token (c: mean keys a query sees, causal and windowed), Gated DeltaNet's chunked core
6 K V + 2 * 64 * (2K + V) per token and head. Stage I adds the teacher's forward. Peak: 989 TFLOP/s (H100/H200
dense bf16).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import itertools
import json
import re
import shutil
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from ivl.bench import trace
from ivl.model.cheap_recompute import cheap, recompute_cheap_activations
from ivl.model.losses import head_losses
from ivl.model.teachers import QWEN2_5_VL_3B, TINY_TEACHER
from ivl.stages import DistillModule, FSDP2Strategy, InstructModule, LongContextModule, distributed, host_batch, lora
from ivl.stages.base import adamw
from ivl.model.convert import student_config

PEAK_FLOPS = 989e12
CASES = ("stage1-layerwise", "stage1-kl", "stage2", "stage3")
LENGTHS = {"stage1-layerwise": 8192, "stage1-kl": 8192, "stage2": 8192, "stage3": 32768}
TINY_LENGTHS = {"stage1-layerwise": 128, "stage1-kl": 128, "stage2": 128, "stage3": 512}
GDN_CHUNK = 64


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
    parser.add_argument("--models", nargs="+", default=["infinitevl", "transformer"],
                        choices=["infinitevl", "transformer"])
    parser.add_argument("--lengths", type=int, nargs="+", help="tokens per step and GPU (default: per case, "
                        + ", ".join(f"{c} {n}" for c, n in LENGTHS.items()) + ")")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (FSDP2 processes)")
    parser.add_argument("--checkpointing", nargs="+", default=["blocks"],
                        type=checkpointing_mode,
                        help="activation checkpointing: off, blocks, mixers, every n-th block (an integer) or a "
                             "share of the blocks (a fraction, 0.75); several values run one after another")
    parser.add_argument("--keep-gathered", action="store_true",
                        help="FSDP2 reshard_after_forward=False: blocks stay gathered from forward to backward")
    parser.add_argument("--no-recompute-cheap", action="store_true",
                        help="blocks whose activations are kept hold their cheap ones too (norm outputs, the SwiGLU "
                             "product, convolution outputs) rather than recompute them in the backward")
    parser.add_argument("--sequences", type=int, default=1,
                        help="sequences of --lengths tokens per step and GPU (InfiniteVL: packed, as the stages "
                             "train; the Transformer: a batch)")
    parser.add_argument("--adamw", default="fused", choices=["fused", "foreach"],
                        help="torch's AdamW implementation (the stages use fused on GPUs)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="Stage III's LoRA dropout (experiments/stage3_long.yaml trains with 0.05)")
    parser.add_argument("--shapes", default="4b", choices=["4b", "tiny"], help="tiny: a CPU smoke run")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also profile one extra step per run: each rank's Chrome trace (gzipped) and a summary "
                             "of where its GPU time went go into this folder")


# ---- the models ----------------------------------------------------------------------------------------------

def teacher_config(shapes: str) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(**(QWEN2_5_VL_3B if shapes == "4b" else TINY_TEACHER))


def build_teacher(shapes: str, device: torch.device) -> nn.Module:
    """The Qwen2.5-VL-3B-shaped teacher (random weights), bf16 on the GPU, frozen."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(teacher_config(shapes), dtype=dtype,
                                                                  attn_implementation="sdpa")
    return teacher.requires_grad_(False).eval()


@torch.no_grad()
def random_init_(model: nn.Module, std: float = 0.02) -> None:
    """Random weights in place (sharded ones too): matrices N(0, std), norm weights 1, other vectors 0."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif re.search(r"(norm|ln_q)[^.]*\.weight$", name):
            p.fill_(1.0)
        else:
            p.zero_()


class BenchWeights:
    """Mixed into the stage modules: the 4B (or tiny) student config of the bench teacher, random weights
    instead of rank 0's checkpoint."""

    bench_shapes = "4b"

    def check_sources(self):
        pass  # no folders: the teacher is built in memory, the weights are random

    def student_config(self):
        return student_config(teacher_config(self.bench_shapes), 0.25, self.hparams.window)

    def fill_weights(self, tied):
        random_init_(self.model)


class BenchInstruct(BenchWeights, InstructModule):
    pass


class BenchLongContext(BenchWeights, LongContextModule):
    pass


class BenchDistill(BenchWeights, DistillModule):
    pass


class CausalLMLosses(nn.Module):
    """transformers' causal LM returning ``ivl.model.losses.head_losses`` (the chunked losses InfiniteVL trains
    with) from its forward, so that under FSDP2 the tied head is read while gathered."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels=None, teacher_hidden=None, teacher_head=None, temperature=1.0,
                label_positions=None, **_):
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state
        return head_losses(hidden, self.lm.lm_head.weight, labels, None, None, teacher_hidden, teacher_head,
                           temperature, label_positions=label_positions)


class TransformerStage(L.LightningModule):
    """The baseline: a Qwen2.5-3B-shaped transformers LM (sdpa), sharded, checkpointed and optimised as the stages
    do. ``case`` picks what trains and the loss (the same as InfiniteVL's for that case)."""

    def __init__(self, case: str, shapes: str, checkpointing, lora_r: int, teacher: nn.Module | None = None,
                 lr: float = 2e-4, keep_gathered: bool = False, adamw_fused: bool | None = None,
                 lora_dropout: float = 0.0, recompute_cheap: bool = True):
        super().__init__()
        self.lora_dropout, self.recompute_cheap = lora_dropout, recompute_cheap
        self.keep_gathered, self.adamw_fused = keep_gathered, adamw_fused
        self.case, self.shapes, self.checkpointing, self.lora_r, self.lr = case, shapes, checkpointing, lora_r, lr
        self.__dict__["teacher"] = teacher
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        text = teacher_config(self.shapes).text_config.to_dict()
        config = Qwen2Config(**{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "rms_norm_eps",
                                                     "tie_word_embeddings")},
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        with torch.device("meta"):
            self.model = CausalLMLosses(Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa"))
        layers = self.model.lm.model.layers
        if self.case == "stage3":
            lora.inject(self.model.lm, lora.lora_config(self.lora_r, 2 * self.lora_r, self.lora_dropout))
            patterns = lora.TRAINABLE
        elif self.case == "stage1-kl":  # the attention of the layers InfiniteVL turns into Gated DeltaNet
            gdn = [str(i) for i in range(len(layers)) if i % 4]
            patterns = [rf"lm\.model\.layers\.({'|'.join(gdn)})\.self_attn\..*"]
        else:
            patterns = [r"lm\..*"]
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(re.fullmatch(r, name) for r in patterns))
        chosen = distributed.checkpointed_blocks(len(layers), self.checkpointing)
        for i in chosen:
            distributed.checkpoint(layers[i].self_attn if self.checkpointing == "mixers" else layers[i])
        if self.recompute_cheap and chosen:
            for i, layer in enumerate(layers):
                if i not in chosen or self.checkpointing == "mixers":
                    recompute_cheap_in_decoder_layer(layer)
        policy = distributed.MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.shapes == "4b" else
                                                  torch.float32, reduce_dtype=torch.float32)
        distributed.store_frozen_in(self.model, policy.param_dtype)
        mesh = self.trainer.strategy.device_mesh["data_parallel"]
        for layer in layers:
            distributed.fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=not self.keep_gathered)
        distributed.fully_shard(self.model, mesh=mesh, mp_policy=policy)
        self.model.to_empty(device=self.trainer.strategy.root_device)
        random_init_(self.model)
        rotary = self.model.lm.model.rotary_emb
        for name, buffer in type(rotary)(rotary.config).named_buffers():
            getattr(rotary, name).copy_(buffer)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        """As the stages do: what the step would read back from the GPU is computed on the host (``host_batch``)."""
        return host_batch.prepare(batch, pin=self.device.type == "cuda")

    def training_step(self, batch, batch_idx):
        if self.case == "stage1-kl":
            with torch.no_grad():
                teacher_hidden = self.teacher.model(input_ids=batch["input_ids"]).last_hidden_state
            return self.model(batch["input_ids"], teacher_hidden=teacher_hidden,
                              teacher_head=self.teacher.lm_head.weight, temperature=2.0).kl
        return self.model(batch["input_ids"], labels=batch["labels"], label_positions=batch["label_positions"]).ce

    def configure_optimizers(self):
        return adamw([p for p in self.model.parameters() if p.requires_grad], fused=self.adamw_fused, lr=self.lr,
                     betas=(0.9, 0.95))


def recompute_cheap_in_decoder_layer(layer: nn.Module) -> None:
    """InfiniteVL's kept blocks' cheap-activation recomputation (``ivl.model.cheap_recompute``) for a transformers
    decoder layer: its two norms' outputs and the SwiGLU product, each computed by transformers' own eager code."""
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.forward = cheap(norm.forward)
    mlp = layer.mlp
    mlp.forward = lambda x: mlp.down_proj(_activated_product(mlp.act_fn, mlp.gate_proj(x), mlp.up_proj(x)))
    recompute_cheap_activations(layer)


@cheap
def _activated_product(act_fn, gate, up):
    return act_fn(gate) * up  # transformers' Qwen2MLP


# ---- FLOPs -----------------------------------------------------------------------------------------------------

def mean_context(length: int, window: int | None) -> float:
    """Mean number of keys a causal (windowed) query attends to over a sequence of ``length`` tokens."""
    w = length if window is None else min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / length


def matrix_params(module: nn.Module, trainable: bool | None = None) -> int:
    """Parameters of the matrices (2-D weights) in ``module``, optionally only the (non-)trainable ones."""
    return sum(p.numel() for p in module.parameters()
               if p.dim() == 2 and (trainable is None or p.requires_grad == trainable))


@dataclass
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def hybrid_flops(model, length: int, blocks: list[int] | None = None, head: bool = True) -> Flops:
    """Per token, for the InfiniteVL language model (``blocks``: only these blocks run, without embeddings or
    head: the layer-wise phase)."""
    text = model.config.text
    blocks = range(text.num_layers) if blocks is None else blocks
    run = sum(matrix_params(model.lm.layers[i]) for i in blocks)
    trained = sum(matrix_params(model.lm.layers[i], trainable=True) for i in blocks)
    if head:
        run += model.lm.lm_head.weight.numel()
        trained += model.lm.lm_head.weight.numel() if model.lm.lm_head.weight.requires_grad else 0
    core = 0.0
    for i in blocks:
        if text.layer_types[i] == "attention":
            core += 4 * text.num_attention_heads * text.head_dim * mean_context(length, text.window)
        else:
            K, V = text.gdn_head_k_dim, text.gdn_head_v_dim
            core += text.gdn_num_heads * (6 * K * V + 2 * GDN_CHUNK * (2 * K + V))
    return Flops(2 * run + core, 2 * run + 2 * trained + 2 * core)


def transformer_flops(lm, length: int, trained: bool = True) -> Flops:
    """Per token, for a transformers Qwen2 causal LM (``trained`` False: forward only, e.g. the teacher)."""
    config = lm.config
    config = getattr(config, "text_config", config)
    layers = lm.model.language_model.layers if hasattr(lm.model, "language_model") else lm.model.layers
    run = sum(matrix_params(layer) for layer in layers) + lm.lm_head.weight.numel()
    head_dim = config.hidden_size // config.num_attention_heads
    core = config.num_hidden_layers * 4 * config.num_attention_heads * head_dim * mean_context(length, None)
    if not trained:
        return Flops(2 * run + core, 0.0)
    weight_grads = sum(matrix_params(layer, trainable=True) for layer in layers)
    weight_grads += lm.lm_head.weight.numel() if lm.lm_head.weight.requires_grad else 0
    return Flops(2 * run + core, 2 * run + 2 * weight_grads + 2 * core)


# ---- one measured run ------------------------------------------------------------------------------------------

class StepTimer(Callback):
    """Wall time of each optimizer step after the warm-up (device synchronised), and the peak memory over them.
    Steps from ``last`` on (a profiled one) are not timed."""

    def __init__(self, warmup: int, last: int | None = None):
        self.warmup, self.last, self.times, self.peak_gib, self._start = warmup, last, [], float("nan"), None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module):
        self._began = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step < self.warmup and trainer.is_global_zero:  # compilation and autotuning show here
            print(f"  warm-up step {trainer.global_step} begins at {time.perf_counter() - self._began:.0f} s",
                  flush=True)
        if trainer.global_step == self.warmup and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if trainer.global_step >= self.warmup and (self.last is None or trainer.global_step < self.last):
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            self._sync(pl_module)
            self.times.append(time.perf_counter() - self._start)
            self._start = None

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=pl_module.device)
            self.peak_gib = float(trainer.strategy.reduce(peak, reduce_op="max"))


class SyncCounter(Callback):
    """Counts the times the host waits for the GPU in step ``at`` (after the timed ones), with where each wait
    comes from: a step that waits cannot run ahead of the GPU, and where the host is the slower side the GPU then
    idles. Uses torch's sync debug mode (``.item()``, ``nonzero``, copies from pageable memory, ...)."""

    def __init__(self, at: int):
        self.at, self.origins, self._saved = at, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.at or pl_module.device.type != "cuda":
            return
        torch.cuda.synchronize()
        self.origins, self._saved = [], warnings.catch_warnings()
        shown = warnings.showwarning

        def record(message, *args, **kwargs):
            if "synchroniz" not in str(message):
                return shown(message, *args, **kwargs)
            ours = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                    and "/lightning/" not in f.filename and "/warnings.py" not in f.filename]
            frame = ours[-1] if ours else traceback.extract_stack()[-2]
            self.origins.append(f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno}")

        self._saved.__enter__()  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._saved is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._saved.__exit__(None, None, None)
        self._saved = None


class StepProfiler(Callback):
    """Profiles step ``at`` (after the timed ones) on every rank: a gzipped Chrome trace per rank and the summary
    of ``ivl.bench.trace`` (printed and written beside it)."""

    def __init__(self, at: int, folder: Path, tag: str):
        self.at, self.folder, self.tag, self._prof = at, folder, tag, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._prof is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{self.tag}-rank{trainer.global_rank}"  # not Path.with_suffix: a tag may hold a dot ("ckpt0.75")
        raw = self.folder / f"{stem}.json"
        self._prof.export_chrome_trace(str(raw))
        with raw.open("rb") as f, gzip.open(f"{raw}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
        try:
            text = trace.format_summary(trace.summarise(f"{raw}.gz"))
        except ValueError as error:  # a CPU run has no kernels
            text = str(error)
        text += "\n\n" + self._prof.key_averages().table(sort_by="self_device_time_total" if pl_module.device.type
                                                         == "cuda" else "self_cpu_time_total", row_limit=30,
                                                         max_name_column_width=80)
        (self.folder / f"{stem}.txt").write_text(text + "\n")
        print(f"# profile of {self.tag}, rank {trainer.global_rank}\n{text.split(chr(10) * 2)[0]}", flush=True)
        self._prof = None


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
            batch.update(cu_seqlens=torch.arange(0, sequences + 1, dtype=torch.int32) * length,
                         sources=["synthetic"] * sequences, tasks=[None] * sequences)
        batches.append(batch)
    return batches


def build_module(case: str, model: str, args, teacher):
    window = 8192 if args.shapes == "4b" else 64
    common = dict(window=window, warmup_ratio=0.0, activation_checkpointing=args.checkpointing,
                  reshard_after_forward=not args.keep_gathered, recompute_cheap=not args.no_recompute_cheap,
                  param_dtype="bfloat16" if args.device == "cuda" else "float32")
    fused = args.adamw == "fused" and args.device == "cuda"
    if model == "transformer":
        return TransformerStage(case, args.shapes, args.checkpointing, args.lora_r,
                                teacher if case == "stage1-kl" else None, keep_gathered=args.keep_gathered,
                                adamw_fused=fused, lora_dropout=args.lora_dropout,
                                recompute_cheap=not args.no_recompute_cheap)
    if case.startswith("stage1"):
        module = BenchDistill(teacher="bench", layerwise_steps=-1 if case == "stage1-layerwise" else 0, **common)
        module.__dict__["teacher"] = teacher
    elif case == "stage2":
        module = BenchInstruct(teacher="bench", **common)
    else:
        module = BenchLongContext(teacher="bench", lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                                  lora_dropout=args.lora_dropout, **common)
    module.bench_shapes, module.adamw_fused = args.shapes, fused
    return module


def step_flops(case: str, model: str, module, teacher, length: int) -> float:
    """Model FLOPs of one step (``length`` tokens on one process)."""
    if model == "transformer":
        flops = transformer_flops(module.model.lm, length).total
    elif case == "stage1-layerwise":
        flops = hybrid_flops(module.model, length, blocks=module.gdn_layers, head=False).total
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
        tag = (f"{case}-{model}-{length}-{args.devices}gpu-ckpt{args.checkpointing}" + "-kept" * args.keep_gathered
               + "-holdcheap" * args.no_recompute_cheap)
        callbacks.append(StepProfiler(steps, args.profile, tag))
        steps += 1
    trainer = L.Trainer(accelerator=accelerator, devices=args.devices, strategy=FSDP2Strategy(),
                        precision="32-true", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=callbacks)
    vocab = teacher_config(args.shapes).text_config.vocab_size
    data = DataLoader(synthetic_batches(case, model, length, vocab, steps, args.sequences), batch_size=None)
    row = dict(case=case, model=model, devices=args.devices, length=length, sequences=args.sequences,
               checkpointing=args.checkpointing, shapes=args.shapes, keep_gathered=args.keep_gathered,
               recompute_cheap=not args.no_recompute_cheap,
               adamw=args.adamw)
    if case == "stage3" and args.lora_dropout:
        row["lora_dropout"] = args.lora_dropout
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
    return {**row, "status": "ok", "step_s": step, "tokens_per_s_per_gpu": tokens / step,
            "mfu": flops / step / PEAK_FLOPS, "peak_gib": timer.peak_gib, "host_syncs": syncs.origins,
            "trainable": sum(p.numel() for p in module.model.parameters() if p.requires_grad)}


def run(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ivl.bench train times GPU steps; no CUDA device is visible (--shapes tiny --device cpu "
                         "for a smoke run)")
    import os

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
                            f.write(json.dumps({**row, "date": str(datetime.date.today()),
                                                "device": _device_name(args)}) + "\n")
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
    lines = [f"\n# {device} | torch {torch.__version__} | {datetime.date.today()}\n",
             "| case | model | GPUs | tokens | checkpointing | AdamW | s/step | tokens/s/GPU | MFU | peak GiB | "
             "host waits/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tokens = f"{r['length']}" + (f" x {r['sequences']}" if r.get("sequences", 1) > 1 else "")
        head = (f"| {r['case']} | {r['model']} | {r['devices']} | {tokens} | {r['checkpointing']}"
                f"{', kept gathered' if r.get('keep_gathered') else ''}"
                f"{', cheap ones held' if r.get('recompute_cheap') is False else ''}"
                f"{f', LoRA dropout {d}' if (d := r.get('lora_dropout')) else ''} | {r.get('adamw', '')} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | |")
            continue
        waits = r.get("host_syncs")
        lines.append(f"{head} {r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
                     f"{r['peak_gib']:.1f} | {'-' if waits is None else len(waits)} |")
    return "\n".join(lines)
