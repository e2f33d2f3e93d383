"""Building blocks shared by the mixers and the blocks: RMSNorm, gated RMSNorm, SwiGLU MLP, multimodal RoPE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivl.kernels.fused import fused
from ivl.kernels.precision import at_least_float32
from ivl.model.training.cheap_recompute import cheap


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * SiLU(gate): Gated DeltaNet's output norm (fla's FusedRMSNormGated), per head."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


@cheap
@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 (as Qwen2 does) so bf16 activations do not lose the small-variance rows.
    x32 = at_least_float32(x)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@cheap
@fused
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = at_least_float32(x)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (at_least_float32(weight) * x32 * F.silu(at_least_float32(gate))).to(x.dtype)


@cheap
@fused
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class MultimodalRotaryEmbedding(nn.Module):
    """Qwen2-VL's multimodal RoPE: each rotary frequency follows one of three position axes (time, height, width).

    ``mrope_section`` gives how many of the head_dim / 2 frequencies each axis takes, lowest frequencies first
    for time. Text tokens carry the same position on all three axes, which reduces this to plain 1D RoPE.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, list(mrope_section)
        self.register_buffer("axis", torch.empty(sum(mrope_section), dtype=torch.long), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the frequency -> axis map (also after materialising from the meta device)."""
        axis = [a for a, n in enumerate(self.mrope_section) for _ in range(n)]
        self.axis.copy_(torch.tensor(axis, device="cpu"))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, T] -> (cos, sin), each [B, T, head_dim]."""
        return _rotary_cos_sin(position_ids, self.axis, self.head_dim, self.theta, dtype)


@fused
def _rotary_cos_sin(position_ids: torch.Tensor, axis: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    # Frequencies are computed here in float32 rather than kept in a buffer, which model.to(bfloat16) would
    # round and so shift every angle at long positions.
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    # The position each frequency rotates by: frequency f follows axis[f].
    pos = position_ids.float()[axis]  # [F, B, T]
    angles = pos.permute(1, 2, 0) * inv_freq  # [B, T, F]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@fused
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by (cos, sin) [B, T, D], pairing dimension i with i + D/2 (the HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]
