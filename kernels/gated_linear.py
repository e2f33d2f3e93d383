"""Gated linear attention: the recurrence shared by GLA, Mamba2 (SSD) and plain linear attention, in fla's conventions.

Per head, with a state S of shape [K, V] and a log-decay g_t that is per key channel ([K], GLA), one number per
head (Mamba2's scalar A dt) or absent (linear attention, no forgetting):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t)

On CUDA this dispatches to fla's Triton kernels (``chunk_gla`` for a per-channel decay, ``chunk_simple_gla``
otherwise). Elsewhere it runs a chunked PyTorch loop in float32. Within a chunk, with cumulative log-decays G_t,

    o_t = (scale q_t * exp(G_t)) S_0 + sum_{j<=t} scale sum_c q_tc k_jc exp(G_tc - G_jc) v_j
    S_C = exp(G_C) S_0 + sum_j (k_j * exp(G_C - G_j)) v_j^T

where every exponent is <= 0 (the decays are taken before the products, never as exp(G_t) exp(-G_j)), so long
chunks of strong decay cannot overflow.
"""

from __future__ import annotations

import torch

from ivl.kernels._fla import (
    fla_backward_is_miscompiled,
    fla_gated_backward_is_refused,
    fla_linear_kernels,
    fla_refusal_lifted,
    fla_simple_gla_function,
)
from ivl.kernels.packed_bounds import host_bounds
from ivl.kernels.precision import at_least_float32

CHUNK_SIZE = 32


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over a batch (or a packed varlen batch).

    Args:
        q, k: [B, T, H, K].
        v: [B, T, H, V].
        g: log-decay (<= 0), [B, T, H, K] (per key channel), [B, T, H] (per head) or None (no decay).
        scale: query scale; defaults to K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or the number of sequences with ``cu_seqlens``).
        output_final_state: also return the state after the last token of each sequence (float32).
        cu_seqlens: int32 [N + 1] boundaries of sequences packed along T (then B must be 1).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] float32 (float64 for float64 inputs) or None)
    """
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if g is not None and g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be [B, T, H] or [B, T, H, K]; got {tuple(g.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError("with cu_seqlens, pack the sequences along T of a batch of 1")
    if scale is None:
        scale = K**-0.5
    if q.is_cuda and fla_linear_kernels() is not None and _fla_may_run(q, k, v, g, initial_state):
        return _fla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        outs, states = [], []
        bounds = host_bounds(cu_seqlens)
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            s0 = initial_state[n : n + 1] if initial_state is not None else None
            o, s = _chunked(
                q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end] if g is not None else None, scale, s0
            )
            outs.append(o)
            states.append(s)
        state = torch.cat(states) if states else None
        return torch.cat(outs, dim=1), (state if output_final_state else None)
    o, state = _chunked(q, k, v, g, scale, initial_state)
    return o, (state if output_final_state else None)


def gated_linear_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, scale: float, state: torch.Tensor
) -> torch.Tensor:
    """One token per row, updating ``state`` [B, H, K, V] (float32) in place: q, k [B, 1, H, K], v [B, 1, H, V],
    g [B, 1, H], [B, 1, H, K] or None. Returns o [B, 1, H, V] in q's dtype. Fixed shapes, no host sync: the decode
    step of the static cache and the CUDA graph."""
    qf, kf, vf = (at_least_float32(t[:, 0]) for t in (q, k, v))
    if g is not None:
        decay = at_least_float32(g[:, 0]).exp()
        state.mul_(decay[..., None, None] if decay.dim() == 2 else decay[..., None])
    state.add_(kf[..., None] * vf[..., None, :])
    o = ((qf * scale)[..., None] * state).sum(-2)
    return o[:, None].to(q.dtype)


def _chunked(q, k, v, g, scale, initial_state):
    B, T, H, K = q.shape
    V, dtype = v.shape[-1], q.dtype
    q, k, v = (at_least_float32(t).transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
    if g is not None:
        g = at_least_float32(g)
        g = (g[..., None] if g.dim() == 3 else g).transpose(1, 2)  # [B, H, T, 1 or K]
    S = at_least_float32(initial_state).clone() if initial_state is not None else q.new_zeros(B, H, K, V)
    out = q.new_empty(B, H, T, V)
    causal = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=q.device).tril()
    for start in range(0, T, CHUNK_SIZE):
        end = min(start + CHUNK_SIZE, T)
        qc, kc, vc = q[:, :, start:end] * scale, k[:, :, start:end], v[:, :, start:end]
        mask = causal[: end - start, : end - start]
        if g is None:
            A = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0)
            out[:, :, start:end] = qc @ S + A @ vc
            S = S + kc.transpose(-1, -2) @ vc
            continue
        G = g[:, :, start:end].cumsum(2)  # [B, H, L, 1 or K]
        if G.shape[-1] == 1:  # one decay per head: a [L, L] matrix of decays between tokens
            decay = (G - G.transpose(-1, -2)).masked_fill(~mask, float("-inf")).exp()
            A = (qc @ kc.transpose(-1, -2)) * decay
        else:  # per key channel: [L, L, K] decays, reduced over the channels with q and k
            decay = (G[:, :, :, None] - G[:, :, None]).masked_fill(~mask[..., None], float("-inf")).exp()
            A = torch.einsum("bhtc,bhjc,bhtjc->bhtj", qc, kc, decay)
        out[:, :, start:end] = (qc * G.exp()) @ S + A @ vc
        last = G[:, :, -1:]  # [B, H, 1, 1 or K]
        S = last.exp().transpose(-1, -2) * S + (kc * (last - G).exp()).transpose(-1, -2) @ vc
    return out.transpose(1, 2).to(dtype), S


def _fla_may_run(q, k, v, g, initial_state) -> bool:
    """fla 0.6 refuses the backward of a per-head decay on Hopper with Triton 3.4 to 3.7.0 (#640), tilelang installed
    or not (fla's TileLang kernel does not take the float32 states this backward keeps). Training steps
    take the PyTorch path only where fla would run its miscompiled BK = 64 tile (K <= 64); at K = 128 (Mamba2's
    state width at 4B) fla's own backward runs with the refusal lifted (``_SimpleGlaRefusalLifted``). Inference,
    and GLA's per-channel kernels (no gated ``chunk_bwd_dqkwg``), always run fla, except below fla's smallest tiles.

    ``chunk_gla`` tiles keys by 32 or 64 and values by 64 or 128. On the tiny test shapes (K 16, V 32, float32) its
    output kernel stopped with "CUDA error: misaligned address" on H100s, twice (2026-11); K 64 and 128 ran. Below
    those tiles the PyTorch path runs (small models only, where it costs little)."""
    if g is not None and g.dim() == 4 and (q.shape[-1] < 32 or v.shape[-1] < 64):
        return False
    if g is None or g.dim() == 4 or not _needs_grad(q, k, v, g, initial_state):
        return True
    return not fla_backward_is_miscompiled(q.shape[-1], tilelang_can_take_it=False)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    chunk_gla, chunk_simple_gla = fla_linear_kernels()
    if g is not None and g.dim() == 4:
        o, state = chunk_gla(
            q,
            k,
            v,
            g.float(),
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    elif (
        g is not None
        and fla_gated_backward_is_refused(tilelang_can_take_it=False)
        and fla_simple_gla_function() is not None
        and _needs_grad(q, k, v, g, initial_state)
    ):
        o, state = _SimpleGlaRefusalLifted.apply(q, k, v, g.float(), scale, initial_state, cu_seqlens)
    else:
        o, state = chunk_simple_gla(
            q,
            k,
            v,
            g=g.float() if g is not None else None,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    return o, (state.float() if state is not None and output_final_state else None)


class _SimpleGlaRefusalLifted(torch.autograd.Function):
    """fla's ``ChunkSimpleGLAFunction`` forward and backward, called with this node's ctx, with fla's #640 refusal
    lifted for this call's backward only. Used where fla refuses but the tile it would run is correct (K > 64 on
    Hopper; ``fla_backward_is_miscompiled``), as ``gated_delta_rule`` does for Gated DeltaNet."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, cu_seqlens):
        return fla_simple_gla_function().forward(
            ctx, q, k, v, g, None, scale, initial_state, True, False, cu_seqlens, None
        )

    @staticmethod
    def backward(ctx, d_o, d_state):
        with fla_refusal_lifted():
            dq, dk, dv, dg, _, _, dh0 = fla_simple_gla_function().backward(ctx, d_o, d_state)[:7]
        return dq, dk, dv, dg, None, dh0, None
