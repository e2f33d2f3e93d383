"""Causal grouped-query attention restricted to a sliding window.

Token i attends to tokens i - window + 1 .. i (``window=None``: all earlier tokens). Backends, fastest first:
flash-attn's varlen kernel (CUDA, when installed), FlexAttention (CUDA), SDPA with an explicit banded mask (CPU,
and the reference the others are tested against).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ivl.kernels import ring_decode
from ivl.kernels._fla import flash_attn_varlen
from ivl.kernels.packed_bounds import host_bounds, to_device
from ivl.kernels.precision import at_least_float32

DECODE_KERNEL = "auto"
"""How a decode step reads the ring on CUDA, read when the step is compiled: "matmul" (two batched products
around a softmax), "split" (``ivl.kernels.ring_decode``'s split-key Triton kernel) or "auto": split where the
rows' key/value heads alone would leave most of the GPU idle (fewer than ``SPLIT_BELOW``), matmul above. On an
H100 at 4B shapes (``python -m ivl.bench ring``): split 13.1 against 22.7 us per layer at batch 1, and 2-5% slower
than matmul at batch 8 and 32."""
SPLIT_BELOW = 16  # rows x key/value heads: at 4B shapes (2 key/value heads), batches below 8


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window causal attention.

    Args:
        q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq a multiple of Hkv (grouped-query attention).
        window: tokens each query sees, itself included; None for full causal attention.
        cu_seqlens: int32 [N + 1] boundaries of sequences packed along T (B must be 1); no token attends across.
        scale: softmax scale; defaults to D ** -0.5.

    Returns:
        [B, T, Hq, D] in q's dtype.
    """
    _check_inputs(q, k, v, window, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.is_cuda and flash_attn_varlen() is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn(q, k, v, window, cu_seqlens, scale)
    if q.is_cuda:
        return _flex_attention(q, k, v, window, cu_seqlens, scale)
    mask = band_mask(q.shape[1], window, cu_seqlens, q.device)
    return _sdpa(q, k, v, mask, scale)


def sliding_window_attention_after_prefix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None = None
) -> torch.Tensor:
    """Sliding-window attention of a chunk that continues a cached prefix: the chunked-prefill path.

    q: [B, T, Hq, D], the chunk's queries; k, v: [B, P + T, Hkv, D], the P cached keys/values in token order
    followed by the chunk's own, all consecutive tokens, so query i is token P + i. On CUDA this is FlexAttention
    with a block-sparse band, so a chunk costs T x window rather than T x (P + T) work; elsewhere SDPA with the
    explicit band.
    """
    P = k.shape[1] - q.shape[1]
    if P < 0 or k.shape != v.shape or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"expected q [B, T, Hq, D] and k, v [B, P + T, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.is_cuda:
        return _flex_attention_after_prefix(q, k, v, P, window, scale)
    positions = torch.arange(k.shape[1], device=q.device)
    return attention_at_positions(q, k, v, positions[P:], positions, window, scale)


def padded_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor,
    window: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention of a padded batch, run as the packed sequences of its real tokens.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; attention_mask [B, T] is 0 at padding, and each row's real tokens are
    consecutive (left or right padding). Padding outputs are zero. Why not SDPA with a padding mask on GPUs: its
    memory-efficient backward is known to return NaN for some padding patterns (pytorch#109517, #178251), the
    suspected cause of Stage I hybrids on padded batches turning NaN; and the varlen kernels
    skip the padding instead of computing it.
    """
    B, T, Hq, D = q.shape
    index, cu_seqlens = _unpadding(attention_mask)
    packed = [t.reshape(B * T, t.shape[2], D).index_select(0, index)[None] for t in (q, k, v)]
    out = sliding_window_attention(*packed, window, cu_seqlens=cu_seqlens, scale=scale)
    return q.new_zeros(B * T, Hq, D).index_copy(0, index, out[0].to(q.dtype)).view(B, T, Hq, D)


_last_unpadding: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _unpadding(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices of the real tokens, int32 cu_seqlens of the rows), remembered for the last mask by identity:
    every attention layer of one forward (and the recomputation of checkpointed blocks) reads the same mask, so
    the host waits for the GPU once per batch (as ``host_bounds``). A mask must not be modified in place after it
    has been read."""
    global _last_unpadding
    if _last_unpadding is None or _last_unpadding[0] is not attention_mask:
        valid = attention_mask.bool()
        index = valid.reshape(-1).nonzero().squeeze(1)
        cu_seqlens = torch.nn.functional.pad(valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        _last_unpadding = (attention_mask, index, cu_seqlens)
    return _last_unpadding[1], _last_unpadding[2]


def attention_at_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    scale: float | None = None,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Window attention where keys carry explicit token indices: the decoding path over a (ring-buffer) cache.

    q: [B, Tq, Hq, D] at token indices q_pos [Tq]; k, v: [B, Tk, Hkv, D] at k_pos [Tk] in any order. A key is seen
    when 0 <= q_pos - k_pos < window (and k_valid [B, Tk], if given, is true: padding and empty slots are not).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dist = q_pos[:, None] - k_pos[None, :]
    mask = dist >= 0
    if window is not None:
        mask = mask & (dist < window)
    mask = mask[None, None]  # [1, 1, Tq, Tk]
    if k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    return _sdpa(q, k, v, mask, scale)


def ring_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """One query per row over a ring of keys: q [B, 1, Hq, D], keys/values [B, Hkv, S, D] (heads first), visible
    [B, S] -> [B, 1, Hq, D]. Every row must see at least one key.

    Decoding reads the whole ring for one query per head, so its speed is the speed of that read: two batched
    products around a softmax, with the query heads of a key/value head as the rows of one product, or on CUDA
    the split-key kernel (``DECODE_KERNEL``).
    """
    B, _, Hq, D = q.shape
    Hkv = keys.shape[1]
    split = DECODE_KERNEL == "split" or (DECODE_KERNEL == "auto" and B * Hkv < SPLIT_BELOW)
    if q.is_cuda and split and ring_decode.supports(D):
        return ring_decode.split_key_attention(q, keys, values, visible)
    grouped = q.view(B, Hkv, Hq // Hkv, D)  # query head h reads key/value head h // (Hq / Hkv)
    scores = at_least_float32(grouped @ keys.transpose(-1, -2)) * D**-0.5  # [B, Hkv, G, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = scores.softmax(-1).to(values.dtype) @ values  # [B, Hkv, G, D]
    return out.reshape(B, 1, Hq, D)


def band_mask(T: int, window: int | None, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[T, T] boolean mask: True where query i may attend to key j."""
    i = torch.arange(T, device=device)
    dist = i[:, None] - i[None, :]
    mask = dist >= 0
    if window is not None:
        mask = mask & (dist < window)
    if cu_seqlens is not None:
        doc = _document_ids(cu_seqlens, T, device)
        mask = mask & (doc[:, None] == doc[None, :])
    return mask


def _check_inputs(q, k, v, window, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, Hq, D] and k, v [B, T, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must agree on B, T and D; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None; got {window}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed along T (B == 1); got B = {q.shape[0]}")


def _document_ids(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    return torch.bucketize(torch.arange(T, device=device), cu[1:], right=True)


def _sdpa(q, k, v, mask, scale):
    # SDPA wants [B, H, T, D]; enable_gqa broadcasts the key/value heads over their query groups.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _flash_attn(q, k, v, window, cu_seqlens, scale):
    B, T, Hq, D = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        max_len = T
    else:
        bounds = host_bounds(cu_seqlens)
        max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = flash_attn_varlen()(
        q.reshape(B * T, Hq, D),
        k.reshape(B * T, -1, D),
        v.reshape(B * T, -1, D),
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        softmax_scale=scale,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )
    return out.reshape(B, T, Hq, D)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_attention(q, k, v, window, cu_seqlens, scale):
    cu = host_bounds(cu_seqlens) if cu_seqlens is not None else None
    return _padded_flex(q, k, v, scale, lambda Tq, Tk: _block_mask(Tq, window, cu, q.device))


def _flex_attention_after_prefix(q, k, v, P, window, scale):
    return _padded_flex(q, k, v, scale, lambda Tq, Tk: _prefix_block_mask(Tq, P, Tk, window, q.device))


def _padded_flex(q, k, v, scale, block_mask_for):
    """FlexAttention over q/k/v [B, T, H, D] padded at the end to whole blocks (``_pad_to_block``), with the block
    mask ``block_mask_for(padded queries, padded keys)``. Padding at the end is exact: causality keeps every
    real query off the padded keys, and the padded queries' rows are dropped."""
    T = q.shape[1]
    q, k, v = _pad_to_block(q), _pad_to_block(k), _pad_to_block(v)
    out = _compiled_flex_attention()(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask_for(q.shape[1], k.shape[1]),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)[:, :T]


FLEX_BLOCK = 128


def _pad_to_block(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] zero-padded along T to a multiple of FlexAttention's block. Once a second length is seen,
    torch.compile recompiles FlexAttention for dynamic lengths, and on an H100 its kernel template then found no
    valid configuration for a length that is not a multiple of the block (bf16, head_dim 128, 100 tokens)."""
    pad = -x.shape[1] % FLEX_BLOCK
    return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x


@functools.lru_cache(maxsize=16)
def _block_mask(T: int, window: int | None, cu_seqlens: tuple[int, ...] | None, device):
    """FlexAttention's block-sparse mask, built once per (length, window, packing): every layer reuses it."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = _document_ids(to_device(torch.tensor(cu_seqlens), device), T, device) if cu_seqlens is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if doc is not None:
            keep = keep & (doc[q_idx] == doc[kv_idx])
        return keep

    # _compile=True builds the mask block by block instead of materialising T x T booleans (4 GB at 64K).
    return create_block_mask(mask_mod, None, None, T, T, device=device, _compile=True)


@functools.lru_cache(maxsize=16)
def _prefix_block_mask(T: int, P: int, keys: int, window: int | None, device):
    """The band for T queries at key indices P .. P + T - 1 over ``keys`` keys, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx + P >= kv_idx
        if window is not None:
            keep = keep & (q_idx + P - kv_idx < window)
        return keep

    return create_block_mask(mask_mod, None, None, T, keys, device=device, _compile=True)
