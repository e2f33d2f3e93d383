"""Gated Linear Attention (Yang et al., 2024): a linear mixer that forgets per key channel, as fla's ``GLA`` layer.

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(K),   log alpha_t = logsigmoid(W2 W1 x_t + b) / 16

with fla's defaults: a rank-16 forget-gate projection, the gate's logits divided by 16, no short convolution,
and a per-head RMSNorm gated by SiLU(g_proj x) before the output projection. Sizes come from the Gated DeltaNet
fields of ``HybridConfig`` (H heads, K = head_k_dim, V = head_v_dim), so a GLA layer has the same state and within
0.1% the same parameters as a Gated DeltaNet layer (33.6M at 4B widths: q/k 2 x 4.2M, v/g/o 3 x 8.4M, the
forget gate 0.07M).
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
from ivl.model.layers import GatedRMSNorm, gated_rms_norm
from ivl.model.mixers.base import DecodeMatrix, RecurrentMixer

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig

GATE_RANK = 16
GATE_LOGIT_NORMALIZER = 16
MIMIC_DECAY = 0.999  # the decay Gated DeltaNet's mimic initialisation starts from


class GLASizes(NamedTuple):
    """What the GLA (and linear attention) decode step needs to know of its shapes."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    eps: float


class GatedLinearAttention(RecurrentMixer):
    label = "GLA"
    from_attention = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight"}
    forgets = True
    """False for plain linear attention (``LinearAttention``): the same layer without the forget gate."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.eps = config.linear_output_eps
        self.num_heads = H = config.linear_num_heads
        self.head_k_dim, self.head_v_dim = config.linear_head_k_dim, config.linear_head_v_dim
        self.hidden_size = hidden = config.hidden_size
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        if self.forgets:
            self.gk_proj = nn.Sequential(
                nn.Linear(hidden, GATE_RANK, bias=False), nn.Linear(GATE_RANK, key_dim, bias=True)
            )
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=self.eps)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        self.reset_mimic()

    @torch.no_grad()
    def reset_mimic(self) -> None:
        """A near pass-through start, as Gated DeltaNet's mimic initialisation: the forget gate ignores its input
        and keeps ``MIMIC_DECAY`` of the state per token."""
        if self.forgets:
            up = self.gk_proj[1]
            up.weight.zero_()
            # logsigmoid(b) / 16 = log(decay)  =>  b = logit(decay ** 16)
            keep = MIMIC_DECAY**GATE_LOGIT_NORMALIZER
            up.bias.fill_(math.log(keep / (1 - keep)))
        self.o_norm.weight.fill_(1.0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: RecurrentCache | None = None,
        token_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; the mixers' common arguments (rope and token_index unused: no positions). Padding
        tokens enter as zeros (``guard``) and write nothing."""
        x = self.guard(x, cu_seqlens, cache, attention_mask)
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q, k = self.q_proj(x).view(B, T, H, K), self.k_proj(x).view(B, T, H, K)
        v, gate = self.v_proj(x).view(B, T, H, V), self.g_proj(x).view(B, T, H, V)
        g = None
        if self.forgets:
            g = F.logsigmoid(at_least_float32(self.gk_proj(x).view(B, T, H, K))) / GATE_LOGIT_NORMALIZER
        o, state = gated_linear_attention(
            q,
            k,
            v,
            g,
            initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        if cache is not None:
            cache.state = state
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, H * V))

    # ---- the mixer contract: cache and fixed-shape decoding ------------------------------------------------------
    def state_shape(self) -> tuple[int, ...]:
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def projection_groups(self) -> dict[str, list[nn.Parameter]]:
        rows = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.g_proj.weight]
        return {"mixer_in": rows + ([self.gk_proj[0].weight] if self.forgets else [])}

    def step_weights(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = {"w_in": packed["mixer_in"], "o_norm": self.o_norm.weight, "w_o": self.o_proj.weight}
        if self.forgets:
            weights["w_gk"], weights["b_gk"] = self.gk_proj[1].weight, self.gk_proj[1].bias
        return weights

    def step_sizes(self) -> GLASizes:
        return GLASizes(self.num_heads, self.head_k_dim, self.head_v_dim, self.eps)

    @staticmethod
    def step(x, weights, buffers, cos, sin, token_index, sizes: GLASizes) -> torch.Tensor:
        H, K, V = sizes.num_heads, sizes.head_k_dim, sizes.head_v_dim
        B = x.shape[0]
        widths = [H * K, H * K, H * V, H * V]
        projected = linear(x, weights["w_in"])
        q, k, v, gate = projected[..., : sum(widths)].split(widths, -1)
        g = None
        if "w_gk" in weights:  # GLA's forget gate (plain linear attention has none)
            logits = linear(projected[..., sum(widths) :], weights["w_gk"], weights["b_gk"])
            g = F.logsigmoid(at_least_float32(logits)).view(B, 1, H, K) / GATE_LOGIT_NORMALIZER
        o = gated_linear_step(q.view(B, 1, H, K), k.view(B, 1, H, K), v.view(B, 1, H, V), g, K**-0.5, buffers["state"])
        o = gated_rms_norm(o, gate.view(B, 1, H, V), weights["o_norm"], sizes.eps)
        return linear(o.reshape(B, 1, H * V), weights["w_o"])

    # ---- the mixer contract: cost ------------------------------------------------------------------------------
    def decode_matrices(self) -> list[DecodeMatrix]:
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if not self.forgets:
            return [
                DecodeMatrix(f"{self.label} q/k/v/g", 2 * H * K + 2 * H * V, self.hidden_size),
                DecodeMatrix(f"{self.label} output", self.hidden_size, H * V),
            ]
        # The forget gate's low-rank down projection is packed with q/k/v/g (they read the same x).
        return [
            DecodeMatrix(f"{self.label} q/k/v/g/gate down", 2 * H * K + 2 * H * V + GATE_RANK, self.hidden_size),
            DecodeMatrix(f"{self.label} gate up", H * K, GATE_RANK),
            DecodeMatrix(f"{self.label} output", self.hidden_size, H * V),
        ]

    def core_flops_per_token(self, length: int, chunk: int = FLA_CHUNK) -> float:
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        C = min(chunk, length)
        # Per head, chunked: the outputs' read of the K x V state and its update, and within each chunk q k^T
        # (C K) and the chunk's attention over its values (C V).
        return H * (4 * K * V + 2 * C * (K + V))
