"""What every training stage shares: the student, which parameters train, optimiser and schedule, logging."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ivl.model import InfiniteVL
from ivl.model.vlm import next_token_targets
from ivl.stages.models import load_student

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "second_per_grid_ts", "cu_seqlens")


class StageModule(L.LightningModule):
    """Base of the three stages.

    Args:
        student: an InfiniteVL checkpoint folder; None converts ``teacher`` (a Qwen2.5-VL folder or "tiny").
        teacher: the Qwen2.5-VL teacher ("tiny": a random tiny one built in code).
        hybrid_ratio, window, gdn_init: conversion settings when the student is converted here.
        trainable: regexes over parameter names; only matching parameters train (default: the stage's own).
        lr, weight_decay, warmup_ratio, betas: AdamW with linear warm-up and cosine decay to 10% of lr.
        save_dir: where ``on_train_end`` writes the trained student (save_pretrained); None: not written.
        seed: seeds the conversion's fresh layers.
    """

    default_trainable: tuple[str, ...] = (".*",)

    def __init__(self, student: str | None = None, teacher: str | None = None, hybrid_ratio: float = 0.25,
                 window: int | None = 8192, gdn_init: str = "mimic", trainable: list[str] | None = None,
                 lr: float = 2e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.95), save_dir: str | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model: InfiniteVL = self.build_student()
        self.adapt_model()
        self.trainable = list(trainable) if trainable is not None else list(self.default_trainable)
        self.set_trainable(self.trainable)

    def build_student(self) -> InfiniteVL:
        h = self.hparams
        return load_student(h.student, h.teacher, h.hybrid_ratio, h.window, h.gdn_init, h.seed)

    def adapt_model(self) -> None:
        """Hook between building the student and choosing what trains (LoRA injection, say)."""

    def set_trainable(self, patterns: list[str]) -> None:
        regex = [re.compile(p) for p in patterns]
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(r.fullmatch(name) for r in regex))
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"no parameter matches trainable={patterns}")

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def log_tokens(self, batch: dict, loss: torch.Tensor, prefix: str = "train") -> None:
        tokens = batch["input_ids"].numel() if "attention_mask" not in batch else int(batch["attention_mask"].sum())
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=1)
        self.log(f"{prefix}/tokens", float(tokens), reduce_fx="sum", batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(total * self.hparams.warmup_ratio))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.export(Path(self.hparams.save_dir))

    def export(self, directory: Path) -> None:
        """The trained student as a plain checkpoint folder (what the next stage or serving loads)."""
        self.model.save_pretrained(directory)


def answer_loss_and_accuracy(model: InfiniteVL, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over answer tokens, computed only where labels are (never a [T, vocab] logits tensor), and
    per-sample exact match of the greedy answer under teacher forcing: a sample counts when the argmax at every
    answer position is its label, which is what greedy decoding of the whole answer would produce."""
    hidden = model.hidden_states(**StageModule.model_inputs(batch))
    targets = next_token_targets(batch["labels"], batch.get("cu_seqlens"))
    positions = (targets != -100).nonzero(as_tuple=True)
    logits = model.lm.lm_head(hidden[:, :-1][positions]).float()
    loss = F.cross_entropy(logits, targets[positions])
    hit = logits.argmax(-1) == targets[positions]
    if "cu_seqlens" in batch:  # the sample each answer token belongs to
        sample = torch.bucketize(positions[1], batch["cu_seqlens"][1:].long(), right=True)
        count = len(batch["cu_seqlens"]) - 1
    else:
        sample, count = positions[0], targets.shape[0]
    wrong = hit.new_zeros(count, dtype=torch.long).index_add_(0, sample, (~hit).long())
    answered = hit.new_zeros(count, dtype=torch.long).index_add_(0, sample, torch.ones_like(sample))
    correct = (wrong == 0).float().masked_fill(answered == 0, float("nan"))
    return loss, correct  # per sample of the batch, NaN where a sample has no answer token
