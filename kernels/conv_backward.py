"""The backward of SiLU(causal depthwise convolution) over [B, T, C], for the linear mixers' short convolutions.

fla's backward kernel (0.6.0) runs its forward again to rebuild the pre-activation, writes it out, reads it back
with the output gradient once per tap, and sums per-tile weight gradients: at Stage II's and Stage III's shapes
(32K tokens, 2,048 to 8,192 channels) it moves about four times the bytes it needs. Here each program streams
the rows of one block of channels in order, keeping the last three inputs and pre-activation gradients in
registers: it reads the input and the output gradient once and writes the input gradient once, and sums its
weight gradients over all its rows before writing them.

Taps: up to four (fla's and InfiniteVL's width); narrower weights are padded with zero taps on the far side.
Packed sequences: ``pos`` gives each token's offset in its sequence, and a tap that would reach into the
previous sequence counts as zero, as in the forward. ``IVL_DISABLE_CONV_BACKWARD=1`` leaves the backward to fla
(to compare the two on a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

TAPS = 4
ENABLED = importlib.util.find_spec("triton") is not None and os.environ.get("IVL_DISABLE_CONV_BACKWARD") != "1"

if ENABLED:
    import triton
    import triton.language as tl

    @triton.jit
    def _row(ptr, i, cols, T, C, ok):
        return tl.load(ptr + i.to(tl.int64) * C + cols, mask=ok & (i >= 0) & (i < T), other=0.0).to(tl.float32)

    @triton.jit
    def _conv_silu_backward_kernel(
        x_ptr, w_ptr, dy_ptr, pos_ptr, dx_ptr, dw_ptr, T, C, n_blocks, ROWS: tl.constexpr, BC: tl.constexpr
    ):
        i_c, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = i_c * BC + tl.arange(0, BC)
        ok = cols < C
        slab = i_b.to(tl.int64) * T * C
        x_ptr += slab
        dy_ptr += slab
        dx_ptr += slab
        # taps w3 (the current token) .. w0 (three tokens back), as in the forward
        w0 = tl.load(w_ptr + cols * 4 + 0, mask=ok, other=0.0)
        w1 = tl.load(w_ptr + cols * 4 + 1, mask=ok, other=0.0)
        w2 = tl.load(w_ptr + cols * 4 + 2, mask=ok, other=0.0)
        w3 = tl.load(w_ptr + cols * 4 + 3, mask=ok, other=0.0)
        t0 = i_t * ROWS
        # the three inputs before the block's first row, and (none yet) the last three pre-activation gradients
        x1 = _row(x_ptr, t0 - 1, cols, T, C, ok)
        x2 = _row(x_ptr, t0 - 2, cols, T, C, ok)
        x3 = _row(x_ptr, t0 - 3, cols, T, C, ok)
        d1 = tl.zeros([BC], dtype=tl.float32)
        d2 = tl.zeros([BC], dtype=tl.float32)
        d3 = tl.zeros([BC], dtype=tl.float32)
        p1 = 0
        p2 = 0
        g0 = tl.zeros([BC], dtype=tl.float32)
        g1 = tl.zeros([BC], dtype=tl.float32)
        g2 = tl.zeros([BC], dtype=tl.float32)
        g3 = tl.zeros([BC], dtype=tl.float32)
        for j in range(0, ROWS + 3):  # rows past T load zeros and store nothing
            i = t0 + j
            # row i: its pre-activation z from inputs i-3 .. i, and dz = dy * SiLU'(z)
            xi = _row(x_ptr, i, cols, T, C, ok)
            p = tl.load(pos_ptr + i, mask=i < T, other=0)
            z = (
                w3 * xi
                + tl.where(p >= 1, w2 * x1, 0.0)
                + tl.where(p >= 2, w1 * x2, 0.0)
                + tl.where(p >= 3, w0 * x3, 0.0)
            )
            sig = tl.sigmoid(z)
            d = _row(dy_ptr, i, cols, T, C, ok) * sig * (1.0 + z * (1.0 - sig))
            if j < ROWS:  # this block's rows: the weight gradients (the last three rows only feed dx)
                g3 += d * xi
                g2 += tl.where(p >= 1, d * x1, 0.0)
                g1 += tl.where(p >= 2, d * x2, 0.0)
                g0 += tl.where(p >= 3, d * x3, 0.0)
            # row i - 3 is reached by outputs i - 3 .. i, each through its own tap
            r = i - 3
            dx = (
                w3 * d3
                + tl.where(p2 >= 1, w2 * d2, 0.0)
                + tl.where(p1 >= 2, w1 * d1, 0.0)
                + tl.where(p >= 3, w0 * d, 0.0)
            )
            tl.store(dx_ptr + r.to(tl.int64) * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok & (r >= t0) & (r < T))
            x3, x2, x1 = x2, x1, xi
            d3, d2, d1 = d2, d1, d
            p2, p1 = p1, p
        row = (i_b * n_blocks + i_t).to(tl.int64) * C * 4
        tl.store(dw_ptr + row + cols * 4 + 0, g0, mask=ok)
        tl.store(dw_ptr + row + cols * 4 + 1, g1, mask=ok)
        tl.store(dw_ptr + row + cols * 4 + 2, g2, mask=ok)
        tl.store(dw_ptr + row + cols * 4 + 3, g3, mask=ok)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``conv_silu_backward`` runs for this input and weight."""
    return ENABLED and x.is_cuda and w.shape[1] <= TAPS


def conv_silu_backward(
    x: torch.Tensor,
    w: torch.Tensor,
    dy: torch.Tensor,
    pos: torch.Tensor,
    rows: int = 256,
    block: int = 128,
    warps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of y = SiLU(causal depthwise conv of x [B, T, C] with w [C, W], tap W-1 on the current token),
    given dy. ``pos`` [T] (int32): each token's offset in its packed sequence (0, 1, 2, ... for plain rows).

    ``rows`` tokens and ``block`` channels per program, one warp each: the setting a sweep on an H100 found
    fastest, or close to it, over the channel widths the linear mixers train at (docs/benchmarks.md). Many small
    programs hide the latency of each row's loads."""
    B, T, C = x.shape
    W = w.shape[1]
    taps = torch.zeros(C, TAPS, device=w.device, dtype=torch.float32)
    taps[:, TAPS - W :] = w
    x, dy = x.contiguous(), dy.contiguous()
    n_blocks = triton.cdiv(T, rows)
    dx = torch.empty_like(x)
    dw = torch.empty(B * n_blocks, C, TAPS, device=x.device, dtype=torch.float32)
    _conv_silu_backward_kernel[(triton.cdiv(C, block), n_blocks, B)](
        x, taps, dy, pos, dx, dw, T, C, n_blocks, ROWS=rows, BC=block, num_warps=warps
    )
    return dx, dw.sum(0)[:, TAPS - W :].to(w.dtype)
