"""What every training stage shares: building (and sharding) the student, which parameters train, optimiser and
schedule, logging, and export."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy

from ivl.data.processing import Processor
from ivl.errors import UsageError
from ivl.model import InfiniteVL, checkpoint
from ivl.model.renames import warn_renamed
from ivl.model.training.losses import HeadLosses
from ivl.stages import distributed, host_batch, lora
from ivl.stages.flops import Flops, hybrid_batch_flops, sequence_lengths
from ivl.stages.models import check_student, check_teacher, load_student, student_config, student_state

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "cu_seqlens",
    "position_ids",
)


class StageModule(L.LightningModule):
    """Base of the three stages.

    The student is built in ``configure_model`` (Lightning calls it before the optimiser): on one device as a
    plain model; under ``ModelParallelStrategy`` / ``FSDP2Strategy`` on the meta device, checkpointed and
    sharded per block, then filled from rank 0's copy of the weights (so no rank holds a full float32 copy
    besides rank 0's while loading). A ``ckpt_path`` restore comes after and wins.

    Args:
        student: an InfiniteVL checkpoint folder; None converts ``teacher`` (a Qwen2.5-VL folder or "tiny").
        teacher: the Qwen2.5-VL teacher ("tiny": a random tiny one built in code).
        hybrid_ratio, window, linear_init, linear_mixer: conversion settings when the student is converted here
            (linear_mixer: the mixer of the replaced layers, "gated_deltanet", "mamba2", "gla" or
            "linear_attention"; linear_init: how those start, "mimic" or "attention").
        trainable: regexes over parameter names; only matching parameters train (default: the stage's own).
            ``{linear}`` and ``{attention}`` stand for the indices of those layers, e.g.
            ``lm\\.layers\\.{linear}\\.mixer\\..*`` for every linear mixer (Gated DeltaNet or the ablation's).
        lr, weight_decay, warmup_ratio, betas: AdamW with linear warm-up and cosine decay to 10% of lr.
        save_dir: where the end of training writes the trained student (a plain ``save_pretrained`` folder, LoRA
            merged in, ``adapter/`` beside it); None: not written.
        seed: seeds the conversion's fresh layers.
        activation_checkpointing: "off", "blocks", "mixers", every n-th block (an int) or a share of the
            blocks (a float in (0, 1)); see ``checkpoint_blocks``.
        param_dtype: under FSDP2, the dtype each unit is gathered and computed in (float32 master weights and
            float32 gradient reduction either way). Parameters that do not train are stored in it
            (``store_frozen_in``); the export writes float32.
        recompute_cheap: with activation checkpointing on, the blocks it keeps recompute their cheap activations
            (norm outputs, the SwiGLU product, convolution outputs) in the backward rather than hold them
            (``ivl.model.training.cheap_recompute``): a kept block then holds much less, which leaves room to keep more
            blocks.
        reshard_after_forward: under FSDP2, free each block's gathered parameters after its forward and gather them
            again for the backward (True, least memory); False keeps them from forward to backward: a third less
            communication for one bf16 copy of the model per GPU.
        gdn_init: the old name of linear_init (still read, with a warning).
    """

    default_trainable: tuple[str, ...] = (".*",)
    adamw_fused: bool | None = None  # None: fused where every trained parameter is on a GPU (see ``adamw``)

    def __init__(
        self,
        student: str | None = None,
        teacher: str | None = None,
        hybrid_ratio: float = 0.25,
        window: int | None = 8192,
        linear_init: str = "mimic",
        trainable: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        save_dir: str | None = None,
        seed: int = 0,
        activation_checkpointing: int | float | str | None = "off",
        param_dtype: str = "bfloat16",
        reshard_after_forward: bool = True,
        linear_mixer: str = "gated_deltanet",
        recompute_cheap: bool = True,
        gdn_init: str | None = None,
    ):
        super().__init__()
        if gdn_init is not None:  # a config written before the rename
            warn_renamed("gdn_init", type(self).__name__)
            linear_init = gdn_init  # noqa: F841 (save_hyperparameters reads this frame's arguments)
        self.save_hyperparameters(ignore=["gdn_init"])
        self.check_sources()
        distributed.checkpointed_blocks(1, activation_checkpointing)  # a bad mode fails here, not after building
        self.model: InfiniteVL | None = None
        self.lora_config = None  # a peft LoraConfig: adapters injected into the language model when building
        self.trainable = list(trainable) if trainable is not None else None
        self.build_hooks: list = []  # callables(stage) run once the student is built, before sharding
        self.thawed_later: list = []  # parameters frozen at the start that a callback unfreezes during the fit
        self.sharded = False

    # ---- building --------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this hook again for every fit/validate/test
            return
        mesh = self._fsdp_mesh()
        if mesh is None:
            self.model = self.build_student()
            self._prepare()
            return
        with torch.device("meta"):
            self.model = InfiniteVL(self.student_config())
        tied = checkpoint.tied_names(self.model)
        self._prepare()
        distributed.store_frozen_in(self.model, getattr(torch, self.hparams.param_dtype), keep=self.thawed_later)
        distributed.shard(
            self.model,
            mesh,
            getattr(torch, self.hparams.param_dtype),
            forward_methods=("head_losses", "block_outputs"),
            reshard_after_forward=self.hparams.reshard_after_forward,
        )
        self.model.to_empty(device=self.trainer.strategy.root_device)
        self.model.reset_buffers()
        self.fill_weights(tied)
        self._reset_adapters()
        self.sharded = True

    def check_sources(self) -> None:
        """Fail now, in one line, if the student or teacher folder is missing (not after the run has started)."""
        check_student(self.hparams.student)
        check_teacher(self.hparams.teacher)

    def _fsdp_mesh(self):
        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return None
        return trainer.strategy.device_mesh["data_parallel"]

    def student_config(self):
        """The student's ``InfiniteVLConfig``, read without building it (from its folder, or the teacher's)."""
        h = self.hparams
        return student_config(h.student, self.conversion_teacher(), h.hybrid_ratio, h.window, h.linear_mixer)

    def fill_weights(self, tied: dict[str, str]) -> None:
        """Load the student's weights into the sharded model: rank 0 reads (or converts) them, all ranks shard."""
        state = None
        if self.trainer.global_rank == 0:
            h = self.hparams
            state = student_state(
                h.student, self.conversion_teacher(), h.hybrid_ratio, h.window, h.linear_init, h.seed, h.linear_mixer
            )
            state = lora.base_layer_names(state, set(self.model.state_dict()))
        distributed.load_full_state(self.model, state, tied)

    def build_student(self) -> InfiniteVL:
        h = self.hparams
        return load_student(
            h.student, self.conversion_teacher(), h.hybrid_ratio, h.window, h.linear_init, h.seed, h.linear_mixer
        )

    def conversion_teacher(self):
        """What a conversion reads the teacher from: its name (a stage with a loaded teacher gives the model)."""
        return self.hparams.teacher

    def _prepare(self) -> None:
        if self.lora_config is not None:
            lora.inject(self.model.lm, self.lora_config)
        self.set_trainable(self.trainable_patterns())
        for hook in self.build_hooks:
            hook(self)
        distributed.checkpoint_blocks(
            self.model.lm, self.hparams.activation_checkpointing, self.hparams.recompute_cheap
        )

    @torch.no_grad()
    def _reset_adapters(self) -> None:
        """Fresh adapters after materialising from the meta device (peft's init: A random, B zero)."""
        for module in self.model.modules():
            if hasattr(module, "reset_lora_parameters"):
                module.reset_lora_parameters(lora.ADAPTER, True)

    # ---- what trains -------------------------------------------------------------------------------------------
    def trainable_patterns(self) -> list[str]:
        return self.trainable if self.trainable is not None else list(self.default_trainable)

    def set_trainable(self, patterns: list[str]) -> None:
        regex = [re.compile(self.expand(p)) for p in patterns]
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(r.fullmatch(name) for r in regex))
        if not any(p.requires_grad for p in self.model.parameters()) and self.fitting():
            raise ValueError(f"no parameter matches trainable={patterns}")

    def fitting(self) -> bool:
        """False under validate/test, where a model with nothing to train (an all-window-attention student in
        Stage I) is still evaluated."""
        return self._trainer is None or self.trainer.state.fn == "fit"

    def expand(self, pattern: str) -> str:
        """``{linear}`` (every linear-mixer layer, whichever mixer: Gated DeltaNet, Mamba2, GLA, ...) /
        ``{attention}`` in a pattern -> an alternation of those layers' indices."""
        if "{gdn}" in pattern:  # a pattern written before the rename
            pattern = pattern.replace("{gdn}", warn_renamed("{gdn}", "trainable pattern"))
        text = self.model.config.text
        for key, layers in (("{linear}", text.linear_layers), ("{attention}", text.attention_layers)):
            pattern = pattern.replace(key, "(" + "|".join(str(i) for i in layers or ["-"]) + ")")
        return pattern

    # ---- steps -----------------------------------------------------------------------------------------------
    def prepare_batch(self, batch):
        """Positions, labelled positions, token count and packed bounds computed on the host (``host_batch``).
        Called from the DataModule's ``on_before_batch_transfer``: with a DataModule, Lightning runs its transfer
        hooks rather than the module's, and the positions are this model's (its multimodal RoPE)."""
        if not isinstance(batch, dict):
            return batch
        return host_batch.prepare(batch, self.model.position_ids, pin=self.device.type == "cuda")

    def batch_arrived(self, batch):
        """After the copy to the device (the DataModule's ``on_after_batch_transfer``)."""
        return host_batch.arrived(batch) if isinstance(batch, dict) else batch

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._ran = batch  # what flops_per_batch counts

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._ran = batch

    @property
    def flops_per_batch(self) -> float | None:
        """Model FLOPs of the batch just run, forward and (training) backward, as ``ivl.stages.flops`` counts
        them: Lightning's ThroughputMonitor reads this after each batch, once the host has waited for the device."""
        batch = getattr(self, "_ran", None)
        if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
            return None
        flops = self.batch_flops(sequence_lengths(batch))
        return flops.total if self.training else flops.forward

    def batch_flops(self, lengths: list[int]) -> Flops:
        return hybrid_batch_flops(self.model, lengths)

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def answer_losses(self, batch: dict) -> HeadLosses:
        """Cross-entropy over answer tokens and per-sample exact match (``InfiniteVL.head_losses``)."""
        return self.model.head_losses(
            labels=batch["labels"], label_positions=batch.get("label_positions"), **self.model_inputs(batch)
        )

    def log_tokens(self, batch: dict, loss: torch.Tensor, prefix: str = "train") -> None:
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=1)
        # A number would be copied to the GPU from pageable memory, which waits; a fill is queued like a kernel.
        tokens = torch.full((), float(host_batch.count_tokens(batch)), device=loss.device)
        self.log(f"{prefix}/tokens", tokens, reduce_fx="sum", batch_size=1)

    def configure_callbacks(self) -> list:
        """Every stage stops at a non-finite training loss rather than training on (``FiniteLoss``)."""
        from ivl.callbacks.finite_loss import FiniteLoss  # here: ivl.callbacks imports the stages

        return [FiniteLoss()]

    def configure_optimizers(self):
        """AdamW; weight decay on matrices only (norm weights, biases and Gated DeltaNet's per-head A_log and
        dt_bias are vectors and are not decayed, as in the public recipe's trainer). On GPUs, torch's fused AdamW:
        one pass over the float32 weights and moments instead of the foreach path's several (``adamw``), except
        under Lightning's AMP precisions with gradient clipping, which refuse fused optimizers."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = self.adamw_fused
        if (
            self._trainer is not None
            and self.trainer.gradient_clip_val
            and isinstance(self.trainer.precision_plugin, MixedPrecision)
        ):
            fused = False  # Lightning's AMP refuses to clip the gradients of an optimizer that unscales them itself
        optimizer = adamw(
            [g for g in groups if g["params"]], fused=fused, lr=self.hparams.lr, betas=tuple(self.hparams.betas)
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(total * self.hparams.warmup_ratio))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- benchmarks (the `test` subcommand with ivl.evaluate.EvalDataModule) -----------------------------------
    def test_step(self, batch, batch_idx: int) -> None:
        evaluate = getattr(self.trainer.datamodule, "evaluate_batch", None)
        if evaluate is None:
            raise UsageError(
                "`test` runs benchmarks: pass --data ivl.evaluate.EvalDataModule --data.benchmarks "
                "'[FILE.tsv, ...]' (the fit data's validation split is scored by `validate`)"
            )
        was_training = self.model.training
        self.model.eval()
        evaluate(self.model, batch)
        self.model.train(was_training)

    def on_test_epoch_end(self) -> None:
        finish = getattr(self.trainer.datamodule, "finish", None)
        if finish is not None:
            for key, value in finish(self.trainer).items():
                self.log(key, value, rank_zero_only=True)

    # ---- export ----------------------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        if self.hparams.save_dir:
            self.export(Path(self.hparams.save_dir))

    def export(self, directory: Path) -> None:
        """The trained student as a plain checkpoint folder (what the next stage, evaluation or serving loads):
        under FSDP2 the full state is gathered to rank 0, which writes it; LoRA adapters are merged into the
        weights and also written as peft's adapter files in ``adapter/``. All ranks must call this."""
        state = distributed.gather_full_state(self.model) if self.sharded else self.model.state_dict()
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        tied = checkpoint.tied_names(self.model)
        # Under FSDP2 frozen weights are stored in param_dtype: written in float32 like the trained ones (and LoRA
        # merges its delta into them in float32).
        upcast = self.sharded
        state = {
            name: t.detach().cpu().float() if upcast and t.is_floating_point() else t.detach().cpu()
            for name, t in state.items()
            if name not in tied
        }
        if self.lora_config is not None:
            state, adapters = lora.split_and_merge(state, lora.scalings(self.model))
            lora.save_adapter(adapters, self.lora_config, directory / "adapter")
        checkpoint.save_state(state, self.model.config.to_dict(), directory)
        h = self.hparams
        processor = getattr(getattr(self._trainer, "datamodule", None), "processor", None)
        if isinstance(processor, Processor):  # the pixel budgets the model was trained with travel with it
            processor.save_pretrained(directory)
        else:
            checkpoint.save_processor(directory, h.student if checkpoint.has_tokenizer(h.student) else h.teacher)


def adamw(params, fused: bool | None = None, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused where every parameter lives on a GPU (``fused`` None), torch's default elsewhere
    (torch does not pick fused itself). The fused kernel reads and writes the weights, gradients and moments once
    per step, where the foreach path makes several passes over them, which a full fine-tune's step feels
    (docs/benchmarks.md)."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if fused is None:
        fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, fused=fused, **kwargs)
