"""Mamba2 (Dao & Gu, 2024): the state-space mixer with one scalar decay per head (SSD), as ``mamba_ssm``'s layer.

One input projection gives z (the output gate), x (the inner stream), B and C (per group) and dt (per head); x, B
and C pass a causal depthwise convolution with SiLU; then, per head h of P channels in group G(h),

    S_t = exp(A_h dt_t) S_{t-1} + B_t (dt_t x_t)^T,    y_t = S_t^T C_t + D_h x_t,    dt_t = softplus(dt_t + dt_bias)

and out_proj(RMSNorm(y * SiLU(z))) with the norm taken per group. In gated-linear-attention terms q = C, k = B,
v = dt x and the log-decay is A dt, which is how it runs (``ivl.kernels.gated_linear``; fla's ``chunk_simple_gla``
on CUDA).

Sizes from ``HybridConfig`` so that a layer matches Gated DeltaNet's: inner width H * V (4096 at 4B), H groups of
B/C of width K (16 x 128), heads of ``mamba2_head_dim`` P channels (64 heads of 64). The state is 64 x 128 x 64
per layer, as GDN's 16 x 128 x 256; the parameters 33.7M against GDN's 33.6M (in_proj 25.3M, out_proj 8.4M).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivl.kernels.gated_linear import gated_linear_attention, gated_linear_step
from ivl.kernels.gemv import linear
from ivl.kernels.packed_bounds import FLA_CHUNK
from ivl.kernels.precision import at_least_float32
from ivl.model.cache import RecurrentCache
from ivl.model.layers import rms_norm
from ivl.model.mixers.base import DecodeMatrix, RecurrentMixer
from ivl.model.mixers.short_convolution import ShortConvolution, conv_step

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig

MIMIC_DT = 1e-3  # as Gated DeltaNet's mimic initialisation: decay exp(-dt) of about 0.999 per token


class Mamba2Sizes(NamedTuple):
    """What Mamba2's step (and the forward's helpers shared with it) needs to know of its shapes."""

    num_groups: int
    state_dim: int
    num_heads: int
    head_dim: int
    eps: float


class Mamba2(RecurrentMixer):
    label = "Mamba2"
    conv_names = ("xBC",)

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.eps = config.linear_output_eps
        self.hidden_size = config.hidden_size
        self.num_groups, self.state_dim = config.linear_num_heads, config.linear_head_k_dim
        self.inner = config.linear_num_heads * config.linear_head_v_dim
        self.head_dim = config.mamba2_head_dim
        self.num_heads = self.inner // self.head_dim
        G, N, nH = self.num_groups, self.state_dim, self.num_heads
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.inner + 2 * G * N + nH, bias=False)
        self.conv1d = ShortConvolution(self.inner + 2 * G * N, config.linear_conv_size)
        self.A_log = nn.Parameter(torch.zeros(nH))
        self.dt_bias = nn.Parameter(torch.zeros(nH))
        self.D = nn.Parameter(torch.ones(nH))
        self.norm_weight = nn.Parameter(torch.ones(self.inner))
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=False)
        self.reset_mimic()

    @torch.no_grad()
    def reset_mimic(self) -> None:
        """A near pass-through start: identity convolution, A = 1 and dt = 1e-3 (a decay of about 0.999, writes
        of a thousandth), D = 1, so the layer starts as out_proj(norm(x * SiLU(z))) over its own x."""
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0
        self.A_log.zero_()
        self.dt_bias.fill_(MIMIC_DT + math.log(-math.expm1(-MIMIC_DT)))  # softplus^{-1}(dt)
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: RecurrentCache | None = None,
        token_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; the mixers' common arguments (rope and token_index unused). Padding tokens enter as
        zeros (``guard``): they write nothing and reach no later token's convolution."""
        x = self.guard(x, cu_seqlens, cache, attention_mask)
        B, T, _ = x.shape
        z, xBC, dt = self.in_proj(x).split(
            [self.inner, self.inner + 2 * self.num_groups * self.state_dim, self.num_heads], -1
        )
        xBC, tail = self.conv1d(xBC, cu_seqlens, cache.conv.get("xBC") if cache is not None else None)
        q, k, v, g, skip = self._ssd_inputs(xBC, dt, self.A_log, self.dt_bias, self.D, self.step_sizes())
        y, state = gated_linear_attention(
            q,
            k,
            v,
            g,
            scale=1.0,
            initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        if cache is not None:
            cache.state, cache.conv = state, {"xBC": tail}
        return self.out_proj(self._gated_norm(y + skip, z, self.norm_weight, self.step_sizes()))

    @staticmethod
    def _ssd_inputs(xBC, dt, A_log, dt_bias, D, sizes: Mamba2Sizes):
        """(q = C, k = B per head, v = dt x, log-decay A dt, skip D x) from the convolved x, B, C and raw dt."""
        G, N, nH, P = sizes.num_groups, sizes.state_dim, sizes.num_heads, sizes.head_dim
        Bsz, T, _ = xBC.shape
        xs, Bs, Cs = xBC.split([nH * P, G * N, G * N], -1)
        dt = F.softplus(at_least_float32(dt) + at_least_float32(dt_bias))  # [B, T, nH]
        heads_per_group = nH // G
        k = Bs.view(Bsz, T, G, N).repeat_interleave(heads_per_group, dim=2)
        q = Cs.view(Bsz, T, G, N).repeat_interleave(heads_per_group, dim=2)
        xs = xs.view(Bsz, T, nH, P)
        v = (at_least_float32(xs) * dt[..., None]).to(xs.dtype)
        g = -at_least_float32(A_log).exp() * dt
        skip = (at_least_float32(xs) * at_least_float32(D)[:, None]).to(xs.dtype)
        return q, k, v, g, skip

    @staticmethod
    def _gated_norm(y, z, weight, sizes: Mamba2Sizes):
        """RMSNorm(y * SiLU(z)) per group of channels (mamba_ssm's RMSNormGated, norm after the gate)."""
        G = sizes.num_groups
        Bsz, T = y.shape[:2]
        gated = (at_least_float32(y.reshape(Bsz, T, -1)) * F.silu(at_least_float32(z))).view(Bsz, T, G, -1)
        return rms_norm(gated, weight.view(G, -1), sizes.eps).reshape(Bsz, T, -1).to(z.dtype)

    # ---- the mixer contract: cache and fixed-shape decoding ------------------------------------------------------
    def state_shape(self) -> tuple[int, ...]:
        return self.num_heads, self.state_dim, self.head_dim

    def conv_layout(self) -> tuple[int, list[int]]:
        return self.conv1d.kernel_size, [self.conv1d.weight.shape[0]]

    def projection_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"mixer_in": [self.in_proj.weight]}

    def step_weights(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "w_in": packed["mixer_in"],
            "conv": self.conv1d.weight[:, 0],
            "A_log": self.A_log,
            "dt_bias": self.dt_bias,
            "D": self.D,
            "norm": self.norm_weight,
            "w_o": self.out_proj.weight,
        }

    def step_sizes(self) -> Mamba2Sizes:
        return Mamba2Sizes(self.num_groups, self.state_dim, self.num_heads, self.head_dim, self.eps)

    @staticmethod
    def step(x, weights, buffers, cos, sin, token_index, sizes: Mamba2Sizes) -> torch.Tensor:
        G, N, nH, P = sizes.num_groups, sizes.state_dim, sizes.num_heads, sizes.head_dim
        z, xBC, dt = linear(x, weights["w_in"]).split([nH * P, nH * P + 2 * G * N, nH], -1)
        xBC = conv_step(buffers["tail"], xBC, weights["conv"])
        q, k, v, g, skip = Mamba2._ssd_inputs(xBC, dt, weights["A_log"], weights["dt_bias"], weights["D"], sizes)
        y = gated_linear_step(q, k, v, g, 1.0, buffers["state"])
        return linear(Mamba2._gated_norm(y + skip, z, weights["norm"], sizes), weights["w_o"])

    # ---- the mixer contract: cost ------------------------------------------------------------------------------
    def decode_matrices(self) -> list[DecodeMatrix]:
        G, N, nH = self.num_groups, self.state_dim, self.num_heads
        return [
            DecodeMatrix("Mamba2 z/x/B/C/dt", 2 * self.inner + 2 * G * N + nH, self.hidden_size),
            DecodeMatrix("Mamba2 output", self.hidden_size, self.inner),
        ]

    def core_flops_per_token(self, length: int, chunk: int = FLA_CHUNK) -> float:
        N, P = self.state_dim, self.head_dim
        C = min(chunk, length)
        width, channels = self.conv_layout()
        # Per head, chunked as GLA with one decay per head: the outputs' read of the N x P state and its update,
        # and within each chunk C B^T (C N) and the chunk's attention over its values (C P). Then the short
        # convolution over x, B and C, W taps per channel.
        return self.num_heads * (4 * N * P + 2 * C * (N + P)) + 2 * width * sum(channels)
