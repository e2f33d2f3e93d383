"""The vision tower: transformers' Qwen2.5-VL vision transformer and patch merger.

The tower is transformers' own (its parameters, checkpoints and window/position logic), scheduled differently with
the same math: each block is two compiled regions around its attention (``VisionBlock``), the attention runs
windows of equal length as one SDPA call (``attend_windows``), and the patch embedding is one matrix product
(``PatchEmbedAsProduct``). A video stream step is 32K patches per layer; on an H100 these took the tower from
277 to 123 ms per 64 frames at 448 px (``python -m ivl.bench vision``; docs/benchmarks.md, streaming).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLVisionBlock,
)

from ivl.kernels.fused import fused
from ivl.model.layers import rms_norm

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
    for module in tower.modules():  # same parameters and math, another schedule
        module.__class__ = _SCHEDULED.get(type(module), type(module))
    return tower


class VisionBlock(Qwen2_5_VLVisionBlock):
    """transformers' vision block as two compiled regions around its windowed attention.

    Eagerly a block is some 30 kernels over [patches, 1280] tensors; compiled (``ivl.kernels.fused``, one
    compilation for every number of patches) each region is a few, with the RMSNorms, the rotary embedding, the
    residual adds and SiLU(gate) * up fused into the products' neighbours. Compiling also pads the MLP's products:
    its width, 3,420, is not a multiple of 8, and eagerly cuBLAS then falls back to Ampere kernels at a third of
    Hopper's speed. The attention between the regions runs its windows batched (``attend_windows``). Same
    parameters, same math (tested against transformers' tower on the CPU and, compiled, on a GPU).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn, mlp = self.attn, self.mlp
        dropout = self.training and attn.attention_dropout > 0
        silu = isinstance(mlp.act_fn, (nn.SiLU, type(ACT2FN["silu"])))
        if attn.config._attn_implementation != "sdpa" or dropout or not silu:
            return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        norm1, norm2 = self.norm1, self.norm2
        q, k, v = _attention_inputs(
            hidden_states, norm1.weight, norm1.variance_epsilon, attn.qkv.weight, attn.qkv.bias,
            *position_embeddings, attn.num_heads,
        )  # fmt: skip
        out = attend_windows(q, k, v, cu_seqlens, attn.scaling)
        return _attention_out_and_mlp(
            hidden_states, out, attn.proj.weight, attn.proj.bias, norm2.weight, norm2.variance_epsilon,
            mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight, mlp.up_proj.bias,
            mlp.down_proj.weight, mlp.down_proj.bias,
        )  # fmt: skip


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2.5-VL RMSNorm: float32 statistics, the weight applied in the input dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@fused
def _attention_inputs(x, norm, eps: float, w_qkv, b_qkv, cos, sin, heads: int):
    """norm1, the qkv product and the rotary embedding: q, k, v [patches, heads, head_dim]."""
    q, k, v = F.linear(_rms_norm(x, norm, eps), w_qkv, b_qkv).reshape(x.shape[0], 3, heads, -1).unbind(1)
    q, k = rotate_vision(q, k, cos, sin)
    return q, k, v


@fused
def _attention_out_and_mlp(x, attn, w_proj, b_proj, norm, eps: float, w_gate, b_gate, w_up, b_up, w_down, b_down):
    """x + proj(attention), then + MLP(norm2 of that): the block's output [patches, hidden]."""
    x = x + F.linear(attn.flatten(1), w_proj, b_proj)
    h = _rms_norm(x, norm, eps)
    return x + F.linear(F.silu(F.linear(h, w_gate, b_gate)) * F.linear(h, w_up, b_up), w_down, b_down)


def attend_windows(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention within each window of ``cu_seqlens`` (q/k/v [patches, heads, D] -> same shape), windows of equal
    length as one batched SDPA call.

    Without flash-attn, transformers runs each window (64 patches at Qwen2.5-VL's 112 px windows) and each image
    of the full-attention layers as its own SDPA call: 16 calls per layer for a 448 px frame pair, thousands per
    step of a video stream, which leaves the GPU waiting on launches. Here the windows are grouped by length
    (whole windows, and the clipped ones at an image's right and bottom edges), each group one call.
    """
    T = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if len(set(lengths)) == 1 and sum(lengths) == T:  # the common case: the windows tile the sequence
        return _batched_attention(q, k, v, lengths[0], scale)
    out = torch.empty_like(q)
    starts = cu_seqlens[:-1].to(q.device, torch.long)
    for length in sorted(set(lengths) - {0}):
        chosen = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=q.device)
        index = (starts[chosen][:, None] + torch.arange(length, device=q.device)).flatten()
        out[index] = _batched_attention(q[index], k[index], v[index], length, scale)
    return out


@fused
def rotate_vision(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb_vision: q, k [T, heads, D] by cos, sin [T, D], in float32."""

    def rotate(x):
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        return (x32 * cos[:, None].float() + torch.cat([-x2, x1], dim=-1) * sin[:, None].float()).to(x.dtype)

    return rotate(q), rotate(k)


def _batched_attention(q, k, v, length: int, scale: float) -> torch.Tensor:
    """Attention within consecutive windows of ``length`` tokens: q/k/v [n * length, heads, D] -> same shape."""
    heads, D = q.shape[1:]
    q, k, v = (t.reshape(-1, length, heads, D).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(-1, heads, D)


class PatchEmbedAsProduct(Qwen2_5_VisionPatchEmbed):
    """transformers' patch embedding, a Conv3d whose kernel is its stride over inputs of exactly one patch, as the
    matrix product it is: cuDNN runs that Conv3d as an implicit-GEMM kernel, 3.9 ms for 32K patches on an H100
    against the product's 0.15 ms."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(hidden_states.to(weight.dtype).view(-1, weight[0].numel()), weight.view(self.embed_dim, -1))


class FusedRMSNorm(Qwen2_5_VLRMSNorm):
    """transformers' RMSNorm as one fused kernel (the patch merger's)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


_SCHEDULED = {
    Qwen2_5_VLVisionBlock: VisionBlock,
    Qwen2_5_VisionPatchEmbed: PatchEmbedAsProduct,
    Qwen2_5_VLRMSNorm: FusedRMSNorm,  # the blocks' own norms run inside their compiled regions
}


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
