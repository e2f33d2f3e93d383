"""The benchmark's models: the Qwen2.5-VL-3B-shaped (or tiny) teacher built in memory, and random weights.

No checkpoint is read: what a training step costs depends on the shapes, not on the weights' values.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.teachers.qwen2_5_vl import QWEN2_5_VL_3B, TINY_TEACHER


def teacher_config(shapes: str) -> Qwen2_5_VLConfig:
    """The teacher's config at the 4B shapes ("4b": Qwen2.5-VL-3B) or the tiny ones ("tiny")."""
    return Qwen2_5_VLConfig(**(QWEN2_5_VL_3B if shapes == "4b" else TINY_TEACHER))


def build_teacher(shapes: str, device: torch.device) -> nn.Module:
    """The Qwen2.5-VL-3B-shaped teacher (random weights), bf16 on the GPU, frozen."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(
            teacher_config(shapes), dtype=dtype, attn_implementation="sdpa"
        )
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
