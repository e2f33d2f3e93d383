"""The causal depthwise short convolution (with SiLU) that linear mixers run over their inputs.

Aware of packed sequences (taps never reach into the previous sequence) and of a cached tail (the last
``W - 1`` inputs of the stream), so that chunked prefill and decoding continue a stream exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ivl.kernels import conv_backward
from ivl.kernels._fla import fla_causal_conv1d
from ivl.kernels.fused import fused
from ivl.kernels.packed_bounds import FLA_CHUNK, chunk_indices
from ivl.model.training.cheap_recompute import mark_recomputable


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


def short_convolution(
    x: torch.Tensor, w: torch.Tensor, cu_seqlens: torch.Tensor | None = None, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU of the causal depthwise convolution of x [B, T, C] with w [C, W] (tap W-1 on the current token),
    continuing ``tail`` [B, W-1, C] (zeros if None), not reaching across ``cu_seqlens`` boundaries; and the new
    tail."""
    if x.is_cuda and x.shape[1] > 1 and fla_causal_conv1d() is not None:
        return _fla_conv(x, w, cu_seqlens, tail)
    pos = None if cu_seqlens is None else sequence_positions(cu_seqlens, x.shape[1], x.device)
    y, new_tail = _causal_conv_silu(x, tail, w, pos)
    return mark_recomputable(y, _conv_output, x, tail, w, pos), new_tail


def _conv_output(x, tail, w, pos):
    return _causal_conv_silu(x, tail, w, pos)[0]


def _fla_conv_forward(x, w, cu_seqlens):
    return fla_causal_conv1d()(x, weight=w, activation="silu", **_packed(cu_seqlens))[0]


def sequence_positions(cu_seqlens: torch.Tensor, T: int, device: torch.device) -> torch.Tensor:
    """Each of T packed tokens' offset in its sequence (long)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    steps = torch.arange(T, device=device)
    return steps - cu[torch.bucketize(steps, cu[1:], right=True)]


def _fla_conv(x, w, cu_seqlens, tail):
    # fla's kernel reads [B, T, C] in place, where the compiled tap loop streams it far below memory bandwidth.
    # A cached tail is prepended and its outputs dropped, which keeps fla's state layout out of it.
    W = w.shape[1]
    conv = fla_causal_conv1d()
    if tail is None:
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad) and conv_backward.supported(x, w):
            y = mark_recomputable(_ConvSilu.apply(x, w, cu_seqlens), _fla_conv_forward, x, w, cu_seqlens)
        else:
            y, _ = conv(x, weight=w, activation="silu", **_packed(cu_seqlens))
        xp = x if x.shape[1] >= W - 1 else torch.cat([x.new_zeros(x.shape[0], W - 1, x.shape[2]), x], dim=1)
        return y, xp[:, -(W - 1) :]
    xp = torch.cat([tail.to(x.dtype), x], dim=1)
    y, _ = conv(xp, weight=w, activation="silu")
    return y[:, W - 1 :], xp[:, -(W - 1) :]


def _packed(cu_seqlens):
    """fla's packed-sequence arguments."""
    if cu_seqlens is None:
        return {}
    return {"cu_seqlens": cu_seqlens, "chunk_indices": chunk_indices(cu_seqlens, FLA_CHUNK)}


class _ConvSilu(torch.autograd.Function):
    """fla's forward kernel, ivl's backward kernel (``ivl.kernels.conv_backward``, faster than fla's backward at
    training lengths: docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, w, cu_seqlens):
        y = _fla_conv_forward(x, w, cu_seqlens)
        ctx.save_for_backward(x, w, cu_seqlens)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, cu_seqlens = ctx.saved_tensors
        T = x.shape[1]
        pos = torch.arange(T, device=x.device) if cu_seqlens is None else sequence_positions(cu_seqlens, T, x.device)
        dx, dw = conv_backward.conv_silu_backward(x, w, dy, pos.to(torch.int32))
        return dx, dw, None


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
    return F.silu(y), xp[:, -(W - 1) :]


def conv_step(tail: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One token per row: x [B, 1, C] convolved with w [C, W] over ``tail`` [B, W-1, C] (advanced in place),
    then SiLU. Fixed shapes, for the static decode step."""
    window = torch.cat([tail, x.to(tail.dtype)], dim=1)  # [B, W, C]: tap W-1 on this token
    y = F.silu((window * w.t()).sum(1, keepdim=True))
    tail.copy_(window[:, 1:])
    return y
