"""Gated DeltaNet: the linear, constant-memory token mixer of the hybrid blocks.

Parameter names follow fla's ``GatedDeltaNet`` layer (q/k/v/a/b/g/o projections, ``A_log``, ``dt_bias``,
``{q,k,v}_conv1d``, ``o_norm``), so checkpoints trained with fla-based code (the public InfiniteVL) map one to one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivl.kernels import gated_delta_rule
from ivl.kernels._fla import fla_causal_conv1d
from ivl.kernels.fused import fused
from ivl.model.cache import RecurrentCache
from ivl.model.layers import GatedRMSNorm

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig

MIMIC_DT = 1e-3
PROJECT_AT_ONCE_MIN_TOKENS = 256


class ShortConvolution(nn.Module):
    """Causal depthwise 1D convolution followed by SiLU, aware of packed sequences and of a cached tail."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))  # nn.Conv1d's layout
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, tail: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C]; tail [B, W-1, C], the inputs before x (zeros if None). Returns (y, new tail)."""
        return short_convolution(x, self.weight[:, 0, :], cu_seqlens, tail)


def short_convolution(x: torch.Tensor, w: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                      tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of the causal depthwise convolution of x [B, T, C] with w [C, W] (tap W-1 on the current token),
    continuing ``tail`` [B, W-1, C] (zeros if None), not reaching across ``cu_seqlens`` boundaries; and the new
    tail."""
    if x.is_cuda and x.shape[1] > 1 and fla_causal_conv1d() is not None:
        return _fla_conv(x, w, cu_seqlens, tail)
    pos = None
    if cu_seqlens is not None:  # each token's offset in its packed sequence
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        steps = torch.arange(x.shape[1], device=x.device)
        pos = steps - cu[torch.bucketize(steps, cu[1:], right=True)]
    return _causal_conv_silu(x, tail, w, pos)


def _fla_conv(x, w, cu_seqlens, tail):
    # fla's kernel reads [B, T, C] in place (the compiled tap loop ran at a twentieth of memory bandwidth on
    # an H100). A cached tail is prepended and its outputs dropped, which keeps fla's state layout out of it.
    W = w.shape[1]
    conv = fla_causal_conv1d()
    if tail is None:
        y, _ = conv(x, weight=w, activation="silu", cu_seqlens=cu_seqlens)
        xp = x if x.shape[1] >= W - 1 else torch.cat([x.new_zeros(x.shape[0], W - 1, x.shape[2]), x], dim=1)
        return y, xp[:, -(W - 1):]
    xp = torch.cat([tail.to(x.dtype), x], dim=1)
    y, _ = conv(xp, weight=w, activation="silu")
    return y[:, W - 1:], xp[:, -(W - 1):]


@fused
def _causal_conv_silu(x: torch.Tensor, tail: torch.Tensor | None, w: torch.Tensor, pos: torch.Tensor | None):
    """(SiLU of the causal depthwise convolution of x [B, T, C] continuing ``tail`` [B, W-1, C] (zeros if None)
    with w [C, W], tap W-1 on the current token; the new tail). pos [T], if given, stops taps at packed-sequence
    starts."""
    W = w.shape[1]
    T = x.shape[1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], W - 1, x.shape[2])
    xp = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    y = None
    for back in range(W):  # tap reaching `back` tokens into the past
        term = xp[:, W - 1 - back : W - 1 - back + T] * w[:, W - 1 - back]
        if pos is not None:  # a tap must not reach into the previous packed sequence
            term = term * (pos >= back)[None, :, None].to(term.dtype)
        y = term if y is None else y + term
    return F.silu(y), xp[:, -(W - 1):]


class GatedDeltaNet(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.gdn_num_heads
        self.head_k_dim = config.gdn_head_k_dim
        self.head_v_dim = config.gdn_head_v_dim
        hidden = config.hidden_size
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, H, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.q_conv1d = ShortConvolution(key_dim, config.gdn_conv_size)
        self.k_conv1d = ShortConvolution(key_dim, config.gdn_conv_size)
        self.v_conv1d = ShortConvolution(value_dim, config.gdn_conv_size)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
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

        Padding tokens (attention_mask 0) enter as zeros: with k = v = 0 they neither write to the state nor
        reach the convolution of later tokens, so a left-padded row ends in the state its unpadded prompt gives.
        """
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        if cache is not None and cu_seqlens is not None:
            raise ValueError("a cache holds one stream per batch row; pass padded batches, not cu_seqlens")
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
        g, beta = _gates(a, b, self.A_log, self.dt_bias)
        o, state = gated_delta_rule(
            q, k, v, g, beta, initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None, cu_seqlens=cu_seqlens,
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
            for p in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.a_proj, self.b_proj))

    def _project_at_once(self, x, cu_seqlens, conv):
        qkv_proj, qkv_conv = (self.q_proj, self.k_proj, self.v_proj), (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        widths = [p.out_features for p in qkv_proj]
        tail = torch.cat([conv[n] for n in "qkv"], dim=-1) if conv else None
        qkv, tail = short_convolution(F.linear(x, torch.cat([p.weight for p in qkv_proj])),
                                      torch.cat([c.weight[:, 0, :] for c in qkv_conv]), cu_seqlens, tail)
        gates = (self.g_proj, self.a_proj, self.b_proj)
        gate, a, b = F.linear(x, torch.cat([p.weight for p in gates])).split([p.out_features for p in gates], -1)
        return (*qkv.split(widths, dim=-1), gate, a, b, tail.split(widths, dim=-1))


@fused
def _gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """(log decay g in float32, write strength beta) per token and head."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.sigmoid()


@fused
def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # fla's l2norm (x / sqrt(sum x^2 + eps)) rather than F.normalize's clamp, to match fla-trained checkpoints.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
