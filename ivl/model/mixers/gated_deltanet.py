"""Gated DeltaNet: the linear, constant-memory token mixer of the hybrid blocks.

Parameter names follow fla's ``GatedDeltaNet`` layer (q/k/v/a/b/g/o projections, ``A_log``, ``dt_bias``,
``{q,k,v}_conv1d``, ``o_norm``), so checkpoints trained with fla-based code (the public InfiniteVL) map one to one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivl.kernels.fused import fused
from ivl.kernels.gated_delta import gated_delta_rule, gated_delta_step
from ivl.kernels.gemv import linear
from ivl.kernels.packed_bounds import FLA_CHUNK
from ivl.kernels.precision import at_least_float32
from ivl.model.cache import RecurrentCache
from ivl.model.layers import GatedRMSNorm, gated_rms_norm
from ivl.model.mixers.base import DecodeMatrix, RecurrentMixer
from ivl.model.mixers.short_convolution import ShortConvolution, conv_step, short_convolution
from ivl.model.training.cheap_recompute import cheap, mark_recomputable

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig

MIMIC_DT = 1e-3
PROJECT_AT_ONCE_MIN_TOKENS = 256


class GatedDeltaNetSizes(NamedTuple):
    """What Gated DeltaNet's decode step needs to know of its shapes."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    eps: float


class GatedDeltaNet(RecurrentMixer):
    label = "Gated DeltaNet"
    from_attention = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight"}
    conv_names = ("q", "k", "v")

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.eps = config.linear_output_eps
        self.num_heads = H = config.linear_num_heads
        self.head_k_dim = config.linear_head_k_dim
        self.head_v_dim = config.linear_head_v_dim
        self.hidden_size = hidden = config.hidden_size
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, H, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.q_conv1d = ShortConvolution(key_dim, config.linear_conv_size)
        self.k_conv1d = ShortConvolution(key_dim, config.linear_conv_size)
        self.v_conv1d = ShortConvolution(value_dim, config.linear_conv_size)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=self.eps)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)
        self.reset_mimic()

    @torch.no_grad()
    def reset_mimic(self) -> None:
        """InfiniteVL's "mimic" initialisation: a fresh layer starts close to a pass-through.

        Identity short convolutions (weight 1 on the current token), zero a/b projections (beta = 0.5),
        A = 1 and dt = 1e-3, so the decay exp(g) = exp(-softplus(dt_bias)) starts at about 0.999.
        """
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
        self.a_proj.weight.zero_()
        self.b_proj.weight.zero_()
        self.A_log.zero_()
        # dt_bias = softplus^{-1}(dt)
        self.dt_bias.fill_(MIMIC_DT + math.log(-math.expm1(-MIMIC_DT)))
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
        """x [B, T, hidden]. Takes the mixers' common arguments; rope and token_index are unused (no positions).
        Padding tokens enter as zeros (``guard``): with k = v = 0 they write nothing to the state."""
        x = self.guard(x, cu_seqlens, cache, attention_mask)
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        conv = cache.conv if cache is not None else {}
        if self._projects_at_once(x):
            q, k, v, gate, a, b, tails = self._project_at_once(x, cu_seqlens, conv)
        else:
            q, conv_q = self.q_conv1d(self.q_proj(x), cu_seqlens, conv.get("q"))
            k, conv_k = self.k_conv1d(self.k_proj(x), cu_seqlens, conv.get("k"))
            v, conv_v = self.v_conv1d(self.v_proj(x), cu_seqlens, conv.get("v"))
            gate, a, b, tails = self.g_proj(x), self.a_proj(x), self.b_proj(x), (conv_q, conv_k, conv_v)
        q, k = _l2norm(q.view(B, T, H, K)), _l2norm(k.view(B, T, H, K))
        v = v.view(B, T, H, V)
        if not v.is_contiguous():  # a slice of the projections at once: fla would copy it and keep the copy
            v = mark_recomputable(v.contiguous(), torch.Tensor.contiguous, v)
        g, beta = _gates(a, b, self.A_log, self.dt_bias)
        o, state = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        if cache is not None:
            cache.state, cache.conv = state, dict(zip("qkv", tails))
        o = self.o_norm(o, gate.view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))

    def _projects_at_once(self, x: torch.Tensor) -> bool:
        """Whether the input projections run as two products (q, k, v; and the gates) and the three
        convolutions as one call: for sequences long enough that concatenating the weights per call costs less
        than the launches it saves (training and prefill, where the host, not the GPU, bounds a step of this
        layer), and only over plain ``nn.Linear`` projections (a LoRA-wrapped one must run through its adapter)."""
        return x.shape[1] >= PROJECT_AT_ONCE_MIN_TOKENS and all(
            type(p) is nn.Linear and p.bias is None
            for p in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj, self.b_proj)
        )

    def _project_at_once(self, x, cu_seqlens, conv):
        qkv_proj, qkv_conv = (self.q_proj, self.k_proj, self.v_proj), (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        widths = [p.out_features for p in qkv_proj]
        tail = torch.cat([conv[n] for n in "qkv"], dim=-1) if conv else None
        qkv, tail = short_convolution(
            F.linear(x, torch.cat([p.weight for p in qkv_proj])),
            torch.cat([c.weight[:, 0, :] for c in qkv_conv]),
            cu_seqlens,
            tail,
        )
        gates = (self.g_proj, self.a_proj, self.b_proj)
        gate, a, b = F.linear(x, torch.cat([p.weight for p in gates])).split([p.out_features for p in gates], -1)
        return (*qkv.split(widths, dim=-1), gate, a, b, tail.split(widths, dim=-1))

    # ---- the mixer contract: cache and fixed-shape decoding ------------------------------------------------------
    def state_shape(self) -> tuple[int, ...]:
        return self.num_heads, self.head_k_dim, self.head_v_dim

    def conv_layout(self) -> tuple[int, list[int]]:
        return self.q_conv1d.kernel_size, [c.weight.shape[0] for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d)]

    def projection_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "mixer_in": [
                self.q_proj.weight,
                self.k_proj.weight,
                self.v_proj.weight,
                self.g_proj.weight,
                self.a_proj.weight,
                self.b_proj.weight,
            ],
            "conv": [self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight],
        }

    def step_weights(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "w_in": packed["mixer_in"],
            "conv": packed["conv"][:, 0],
            "A_log": self.A_log,
            "dt_bias": self.dt_bias,
            "o_norm": self.o_norm.weight,
            "w_o": self.o_proj.weight,
        }

    def step_sizes(self) -> GatedDeltaNetSizes:
        return GatedDeltaNetSizes(self.num_heads, self.head_k_dim, self.head_v_dim, self.eps)

    @staticmethod
    def step(x, weights, buffers, cos, sin, token_index, sizes: GatedDeltaNetSizes) -> torch.Tensor:
        """One token per row: the packed projections, the three convolutions at once, the delta-rule update of
        the state in place, the gated norm and the output projection."""
        H, K, V = sizes.num_heads, sizes.head_k_dim, sizes.head_v_dim
        B = x.shape[0]
        q, k, v, gate, a, b = linear(x, weights["w_in"]).split([H * K, H * K, H * V, H * V, H, H], -1)
        q, k, v = conv_step(buffers["tail"], torch.cat([q, k, v], dim=-1), weights["conv"]).split(
            [H * K, H * K, H * V], -1
        )
        q, k = _l2norm(q.view(B, 1, H, K)), _l2norm(k.view(B, 1, H, K))
        g, beta = _gates(a, b, weights["A_log"], weights["dt_bias"])
        o = gated_delta_step(q, k, v.view(B, 1, H, V), g, beta, K**-0.5, buffers["state"])
        o = gated_rms_norm(o, gate.view(B, 1, H, V), weights["o_norm"], sizes.eps)
        return linear(o.reshape(B, 1, H * V), weights["w_o"])

    # ---- the mixer contract: cost ------------------------------------------------------------------------------
    def decode_matrices(self) -> list[DecodeMatrix]:
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        return [
            DecodeMatrix("Gated DeltaNet q/k/v/g/a/b", 2 * H * K + 2 * H * V + 2 * H, self.hidden_size),
            DecodeMatrix("Gated DeltaNet output", self.hidden_size, H * V),
        ]

    def core_flops_per_token(self, length: int, chunk: int = FLA_CHUNK) -> float:
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        C = min(chunk, length)
        width, channels = self.conv_layout()
        # Per head, as fla's chunked kernel computes it: three products with the K x V state (the outputs' and the
        # delta rule's corrections' reads of it, and its update), and within each chunk q k^T and k k^T (C K each)
        # and the chunk's attention over its values (C V). Then the short convolutions, W taps per channel.
        return H * (6 * K * V + 2 * C * (2 * K + V)) + 2 * width * sum(channels)


@fused
def _gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """(log decay g in float32, or float64 for a float64 model; write strength beta) per token and head."""
    g = -at_least_float32(A_log).exp() * F.softplus(at_least_float32(a) + at_least_float32(dt_bias))
    return g, b.sigmoid()


@cheap
@fused
def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # fla's l2norm (x / sqrt(sum x^2 + eps)) rather than F.normalize's clamp, to match fla-trained checkpoints.
    x32 = at_least_float32(x)
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
