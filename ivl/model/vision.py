"""The vision tower: transformers' Qwen2.5-VL vision transformer and patch merger.

The tower is transformers' own, with one change to how its sdpa attention is scheduled (``WindowBatchedAttention``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)

# Keys of a transformers config dict that describe the library, not the tower.
BOOKKEEPING = {
    "transformers_version",
    "architectures",
    "_name_or_path",
    "model_type",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "problem_type",
}


def vision_config_dict(config: Qwen2_5_VLVisionConfig) -> dict:
    """The tower's own settings from a transformers vision config (what InfiniteVLConfig.vision stores)."""
    return {k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING}


def build_vision_tower(vision: dict, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised Qwen2.5-VL vision tower: ViT + 2x2 patch merger into the LM width."""
    config = Qwen2_5_VLVisionConfig(**vision)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation=attn_implementation)
    if attn_implementation == "sdpa":
        for block in tower.blocks:
            block.attn.__class__ = WindowBatchedAttention  # same parameters, another schedule
    return tower


class WindowBatchedAttention(Qwen2_5_VLVisionAttention):
    """transformers' vision attention, with its attention windows of equal length run as one batched SDPA call.

    Without flash-attn, transformers runs each window (64 patches at Qwen2.5-VL's 112 px windows) and each image
    of the full-attention layers as its own SDPA call: 16 calls per layer for a 448 px frame pair, thousands per
    step of a video stream, which leaves the GPU waiting on launches. Here the windows are grouped by length
    (whole windows, and the clipped ones at an image's right and bottom edges) and each group is one call over a
    batch of windows. Same parameters, same math (tested against transformers' layer).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.config._attn_implementation != "sdpa" or (self.training and self.attention_dropout > 0):
            return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        T = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(T, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)  # [T, heads, head_dim]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if len(set(lengths)) == 1 and sum(lengths) == T:  # the common case: the windows tile the sequence
            out = _batched_attention(q, k, v, lengths[0], self.scaling)
        else:
            out = torch.empty_like(q)
            starts = cu_seqlens[:-1].to(q.device, torch.long)
            for length in sorted(set(lengths) - {0}):
                chosen = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=q.device)
                index = (starts[chosen][:, None] + torch.arange(length, device=q.device)).flatten()
                out[index] = _batched_attention(q[index], k[index], v[index], length, self.scaling)
        return self.proj(out.reshape(T, -1))


def _batched_attention(q, k, v, length: int, scale: float) -> torch.Tensor:
    """Attention within consecutive windows of ``length`` tokens: q/k/v [n * length, heads, D] -> same shape."""
    heads, D = q.shape[1:]
    q, k, v = (t.reshape(-1, length, heads, D).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(-1, heads, D)


@torch.no_grad()
def reset_vision_buffers(tower: nn.Module) -> None:
    """Recompute the tower's rotary frequencies (non-persistent buffers, in no checkpoint) from its config."""
    rotary = tower.rotary_pos_emb
    fresh = type(rotary)(rotary.config)  # holds buffers only: cheap to build on the CPU
    for name, buffer in fresh.named_buffers():
        getattr(rotary, name).copy_(buffer)


def vision_features(tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Merged patch features [sum over items of t*h*w/merge^2, LM hidden] for flattened patches [N, C*t*p*p]."""
    out = tower(pixel_values.to(tower.dtype), grid_thw=grid_thw)
    return out.pooler_output
