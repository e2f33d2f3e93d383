"""The gated delta rule (Gated DeltaNet's token mixer), in fla's conventions.

Per head, with a state S of shape [K, V] and alpha_t = exp(g_t):

    S_t = alpha_t * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,        o_t = S_t^T (scale * q_t)

On CUDA this dispatches to flash-linear-attention's Triton kernels. Elsewhere it runs a chunked PyTorch
implementation (the WY form that fla's kernels use), vectorised over chunks, accumulating in float32.

Chunked form, for a chunk starting from state S_0 with cumulative log-decay G_t (within the chunk):
writing u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t) so that S_t = alpha_t S_{t-1} + k_t u_t^T,

    (I + A) U = diag(beta) V - diag(beta e^G) K S_0,     A_tj = beta_t e^{G_t - G_j} k_t.k_j  (j < t)
    o_t       = e^{G_t} S_0^T q_t + sum_{j<=t} e^{G_t - G_j} (q_t.k_j) u_j
    S_C       = e^{G_C} S_0 + sum_j e^{G_C - G_j} k_j u_j^T

Everything except the S_0 terms is independent across chunks, so only a short loop over chunks remains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ivl.kernels._fla import (
    fla_backward_is_miscompiled,
    fla_chunk_function,
    fla_gated_backward_is_refused,
    fla_gated_delta,
    fla_refusal_lifted,
)
from ivl.kernels.packed_bounds import FLA_CHUNK, chunk_indices, host_bounds
from ivl.kernels.precision import at_least_float32
from ivl.kernels.value_heads import merge_value_heads, split_value_heads, splits

CHUNK_SIZE = 64

VALUE_HEAD_WIDTH: int | None = None
"""On CUDA, run fla's chunked kernel with each value head split into heads of this width (``ivl.kernels.
value_heads``; exact). 128 makes InfiniteVL's heads (K 128, V 256) the K = V = 128 shape that fla hands to FlashQLA
when flash-qla is installed. None (the default): fla's own layout, V = 256 per head. Measured on an H100
(docs/benchmarks.md, FlashQLA): FlashQLA's rule alone is 1.1-2.3x faster, but a 128K prefill is 6% slower."""


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a batch (or a packed varlen batch).

    Args:
        q, k: [B, T, H, K] (normalise them before calling; they are used as given).
        v: [B, T, H, V].
        g: [B, T, H] log-decay (<= 0).
        beta: [B, T, H] write strength in (0, 1).
        scale: query scale; defaults to K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or the number of sequences with ``cu_seqlens``).
        output_final_state: also return the state after the last token of each sequence (float32).
        cu_seqlens: int32 [N + 1] boundaries of sequences packed along T (then B must be 1).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] float32 (float64 for float64 inputs) or None)
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.is_cuda and fla_gated_delta() is not None:
        chunked = q.shape[1] > 1 or cu_seqlens is not None
        if chunked and splits(v.shape[-1], VALUE_HEAD_WIDTH) and not fla_backward_is_miscompiled(q.shape[-1]):
            heads = v.shape[2]
            v, g, beta, initial_state = split_value_heads(v, g, beta, initial_state, VALUE_HEAD_WIDTH)
            o, state = _through_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
            return merge_value_heads(o, state, heads)
        return _through_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        return _varlen(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    if q.shape[1] == 1:
        o, state = _recurrent_step(q, k, v, g, beta, scale, initial_state)
    else:
        o, state = _chunked(q, k, v, g, beta, scale, initial_state)
    return o, (state if output_final_state else None)


def _through_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """fla's kernels (fla's value heads may be grouped: v, g, beta and the state with HV = a multiple of H heads)."""
    chunk, recurrent = fla_gated_delta()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
    )
    if needs_grad and fla_gated_backward_is_refused():
        # fla refuses its backward here (#640): run it anyway where the tile is correct (K > 64), and
        # differentiate the PyTorch path only where the miscompiled BK = 64 tile would run.
        if fla_backward_is_miscompiled(q.shape[-1]) or fla_chunk_function() is None:
            o, state = _FlaForwardTorchBackward.apply(q, k, v, g, beta, initial_state, scale, cu_seqlens)
        else:
            o, state = _FlaRefusalLifted.apply(q, k, v, g, beta, initial_state, scale, cu_seqlens)
        return o, (state if output_final_state else None)
    # fla's recurrent kernel is the fast one for decoding single tokens; the chunked one for everything else.
    fn = recurrent if q.shape[1] == 1 and cu_seqlens is None else chunk
    o, state = fn(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **_fla_chunks(cu_seqlens),
    )
    return o, (state.float() if state is not None else None)


class _FlaRefusalLifted(torch.autograd.Function):
    """fla's own chunked forward and backward (its ``ChunkGatedDeltaRuleFunction``, called with this node's ctx),
    with fla's #640 refusal lifted for the backward of this call only (``fla_refusal_lifted``). Used where fla
    refuses but the tile it would run is correct (K > 64 on Hopper, see ``fla_backward_is_miscompiled``)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu_seqlens):
        return fla_chunk_function().forward(
            ctx,
            q,
            k,
            v,
            g,
            beta,
            scale,
            initial_state,
            True,
            state_v_first=False,
            cu_seqlens=cu_seqlens,
            **_fla_chunks(cu_seqlens),
        )

    @staticmethod
    def backward(ctx, d_o, d_state):
        with fla_refusal_lifted():
            dq, dk, dv, dg, dbeta, _, dh0 = fla_chunk_function().backward(ctx, d_o, d_state)[:7]
        return dq, dk, dv, dg, dbeta, dh0, None, None


class _FlaForwardTorchBackward(torch.autograd.Function):
    """fla's chunked forward; the backward recomputes the chunked PyTorch path and differentiates it.

    Used only where fla's own gated backward would run its miscompiled tile (``fla_backward_is_miscompiled``:
    Hopper, Triton 3.4 to 3.7.0, K <= 64): training stays correct there, at the cost of a slower backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu_seqlens):
        chunk, _ = fla_gated_delta()
        o, state = chunk(
            q,
            k,
            v,
            g=g,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            **_fla_chunks(cu_seqlens),
        )
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, state.float()

    @staticmethod
    def backward(ctx, d_o, d_state):
        q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
        inputs = [t.detach().float().requires_grad_() for t in (q, k, v, g, beta)]
        h0 = initial_state.detach().float().requires_grad_() if initial_state is not None else None
        with torch.enable_grad():
            if cu_seqlens is not None:
                o, state = _varlen(*inputs, ctx.scale, h0, True, cu_seqlens)
            else:
                o, state = _chunked(*inputs, ctx.scale, h0)
            wrt = inputs + ([h0] if h0 is not None else [])
            grads = torch.autograd.grad((o, state), wrt, (d_o.float(), d_state.float()))
        grads = [gr.to(t.dtype) for gr, t in zip(grads, (q, k, v, g, beta))] + [
            grads[5].to(initial_state.dtype) if initial_state is not None else None
        ]
        return (*grads, None, None)


def _fla_chunks(cu_seqlens) -> dict:
    """fla's chunk indices for a packed batch, built from the host bounds (fla's own would wait for the GPU)."""
    return {} if cu_seqlens is None else {"chunk_indices": chunk_indices(cu_seqlens, FLA_CHUNK)}


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V]; got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(t.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed along T (B == 1); got B = {B}")
        bounds = host_bounds(cu_seqlens)
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must run from 0 to T = {T}; got {list(bounds)}")
    if initial_state is not None:
        n = B if cu_seqlens is None else len(cu_seqlens) - 1
        want = (n, H, q.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [N, H, K, V] = {list(want)}; got {tuple(initial_state.shape)}")


def gated_delta_step(q, k, v, g, beta, scale: float, state: torch.Tensor) -> torch.Tensor:
    """One token per row (q/k [B, 1, H, K], v [B, 1, H, V], g/beta [B, 1, H]) for fixed-buffer decoding: ``state``
    [B, H, K, V] (float32) advances in place; returns o [B, 1, H, V].

    On CUDA an opaque op, so that a compiled decode step keeps it whole instead of tracing into it: fla's
    recurrent kernel (one pass over the state) when fla is installed. Elsewhere the PyTorch step.
    """
    if q.is_cuda:
        return torch.ops.ivl.gated_delta_step(q, k, v, g, beta, state, scale)
    return _step_in_place(q, k, v, g, beta, state, scale)


def _step_in_place(q, k, v, g, beta, state, scale):
    o, new_state = _recurrent_step(q, k, v, g, beta, scale, state)
    state.copy_(new_state)
    return o.to(v.dtype)


@torch.library.custom_op("ivl::gated_delta_step", mutates_args=("state",))
def _gated_delta_step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if fla_gated_delta() is None:
        return _step_in_place(q, k, v, g, beta, state, scale)
    _, recurrent = fla_gated_delta()
    o, new_state = recurrent(q, k, v, g=g, beta=beta, scale=scale, initial_state=state, output_final_state=True)
    state.copy_(new_state)
    return o


@_gated_delta_step_op.register_fake
def _(q, k, v, g, beta, state, scale):
    return v.new_empty(v.shape)  # contiguous, as fla's kernel and the PyTorch step return it


def _recurrent_step(q, k, v, g, beta, scale, state):
    """One token per sequence ([B, 1, H, *]): the decoding path, no chunk bookkeeping."""
    out_dtype = q.dtype
    q, k, v, g, beta = (at_least_float32(t[:, 0]) for t in (q, k, v, g, beta))
    B, H, K = k.shape
    if state is None:
        state = k.new_zeros(B, H, K, v.shape[-1])
    state = at_least_float32(state) * g.exp()[..., None, None]
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", state, q * scale)
    return o[:, None].to(out_dtype), state


def _chunked(q, k, v, g, beta, scale, initial_state, chunk_size: int = CHUNK_SIZE):
    out_dtype = q.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    # Padding at the end with beta = 0 and g = 0 leaves the state untouched, so the final state is exact.
    q, k, v = (F.pad(at_least_float32(t), (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(at_least_float32(t), (0, 0, 0, pad)) for t in (g, beta))
    n = (T + pad) // C
    # [B, H, n, C, *]
    q, k, v = (t.reshape(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    g, beta = (t.reshape(B, n, C, H).permute(0, 3, 1, 2) for t in (g, beta))
    q = q * scale

    G = g.cumsum(-1)  # [B, H, n, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # e^{G_t - G_j} for j <= t; masked before exp so that j > t cannot overflow.
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    strict = decay.masked_fill(torch.eye(C, dtype=torch.bool, device=q.device), 0.0)
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * strict
    eye = torch.eye(C, device=q.device).expand_as(A)
    # T_inv = (I + A)^{-1} applied by a unit lower-triangular solve.
    U0 = torch.linalg.solve_triangular(eye + A, beta[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(eye + A, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()  # [B, H, n]

    S = q.new_zeros(B, H, K, V) if initial_state is None else at_least_float32(initial_state)
    outs = []
    # unbind once: indexing chunk i inside the loop would make autograd allocate a full-size gradient per chunk,
    # which turns the backward quadratic in the length.
    per_chunk = zip(*(t.unbind(2) for t in (U0, W, q_decayed, qk, k_to_end, chunk_decay)))
    for u0, w, qd, qk_i, k_end, decay_i in per_chunk:
        u = u0 - w @ S
        outs.append(qd @ S + qk_i @ u)
        S = decay_i[..., None, None] * S + k_end.transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2)  # [B, H, n, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return o.to(out_dtype), S


def _varlen(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """Packed sequences: scatter into a zero-padded [N, T_max] batch, run, gather back.

    Zero padding at the end of a sequence (beta = 0, g = 0) neither writes to nor decays the state, so the
    per-sequence final states are exact and nothing crosses a sequence boundary.
    """
    bounds = host_bounds(cu_seqlens)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    N, t_max = len(lengths), max(lengths)
    seq = torch.repeat_interleave(
        torch.arange(N, device=q.device), torch.tensor(lengths, device=q.device), output_size=bounds[-1]
    )
    pos = torch.arange(q.shape[1], device=q.device) - cu_seqlens.to(q.device).long()[seq]

    def to_padded(t):
        out = t.new_zeros(N, t_max, *t.shape[2:])
        out[seq, pos] = t[0]
        return out

    o, state = _chunked(*(to_padded(t) for t in (q, k, v, g, beta)), scale, initial_state)
    return o[seq, pos][None], (state if output_final_state else None)
