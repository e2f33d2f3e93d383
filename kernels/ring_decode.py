"""Split-key decode attention over the window's ring (flash-decoding), a Triton kernel.

A decode step reads each attention layer's whole ring (8K keys and values per row at 4B shapes) for one query per
head, so its time is the time of that read. Two batched products around a softmax leave the second product, a
reduction over all 8K keys, to a handful of thread blocks at batch 1: the ring is read at about 13% of copy
bandwidth (``python -m ivl.bench ring``). Here each program takes one (row, key/value head) and one slice of the
keys, keeps the query heads of that key/value head as the rows of its tiles (grouped-query attention reads each
key once), and leaves a partial softmax (running max, sum, weighted values); a few PyTorch ops then merge the
slices. The kernel is a ``torch.library.triton_op``, so ``torch.compile`` and CUDA graphs see it as one kernel.
"""

from __future__ import annotations

import importlib.util

import torch

ENABLED = importlib.util.find_spec("triton") is not None
BLOCK_N = 64  # keys per tile
TARGET_PROGRAMS = 528  # four per SM of an H100, where the ring is long enough (at least 128 keys per slice)


def slices_for(rows: int, kv_heads: int, keys: int) -> int:
    """Key slices per (row, key/value head): up to ``TARGET_PROGRAMS`` programs in all, at least 128 keys each
    (at 4B shapes and batch 1: 64 slices of 128 keys, 128 programs)."""
    wanted = -(-TARGET_PROGRAMS // (rows * kv_heads))
    return max(1, min(wanted, keys // 128))


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head width (a power of two, at least one tensor-core tile deep)."""
    return ENABLED and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def split_key_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
    """q [B, 1, Hq, D], keys/values [B, Hkv, S, D], visible [B, S] -> [B, 1, Hq, D] (see ``ring_decode_attention``)."""
    B, _, Hq, D = q.shape
    Hkv = keys.shape[1]
    acc, m, s = torch.ops.ivl.ring_decode_slices(q.reshape(B, Hq, D), keys, values, visible.to(torch.uint8))
    # Merge the slices' partial softmaxes: rescale each to the largest running max.
    G = Hq // Hkv
    acc, m, s = acc[..., :G, :], m[..., :G], s[..., :G]  # [B, Hkv, slices, G(, D)]
    top = m.amax(2, keepdim=True)
    weight = torch.exp(m - top)  # a slice that saw no visible key has m = -inf: weight 0
    out = (acc * weight[..., None]).sum(2) / (s * weight).sum(2)[..., None]  # [B, Hkv, G, D]
    return out.reshape(B, 1, Hq, D).to(q.dtype)


if ENABLED:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _slices_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        visible_ptr,
        acc_ptr,
        m_ptr,
        s_ptr,
        S,
        scale,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        HKV: tl.constexpr,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        SLICES: tl.constexpr,
        KEYS_PER_SLICE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row_head = tl.program_id(0)
        part = tl.program_id(1)
        b = row_head // HKV
        h = row_head % HKV
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        # q is [B, Hq, D] contiguous: query heads h * G .. h * G + G - 1 read key/value head h.
        q = tl.load(q_ptr + (b * HKV * G + h * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        s = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
        start = part * KEYS_PER_SLICE
        for offset in range(0, KEYS_PER_SLICE, BLOCK_N):
            n = start + offset + tl.arange(0, BLOCK_N)
            inside = n < S
            seen = tl.load(visible_ptr + b * S + n, mask=inside, other=0) != 0
            k = tl.load(k_base + n[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
            scores = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # [G_PAD, BLOCK_N] (scale may come as fp64)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() finite
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(m - shift)
            v = tl.load(v_base + n[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
            s = s * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = (row_head * SLICES + part) * G_PAD + g
        tl.store(acc_ptr + out[:, None] * D + d[None, :], acc)
        tl.store(m_ptr + out, m)
        tl.store(s_ptr + out, s)

    @triton_op("ivl::ring_decode_slices", mutates_args=())
    def ring_decode_slices(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (row, key/value head, key slice): the weighted values [B, Hkv, slices, G_PAD, D], running max and
        sum [B, Hkv, slices, G_PAD] of the query heads of that key/value head over the slice, float32."""
        B, Hq, D = q.shape
        _, Hkv, S, _ = keys.shape
        if keys.stride(-1) != 1 or keys.stride(-2) != D or values.stride(-1) != 1 or values.stride(-2) != D:
            raise ValueError("ring_decode_slices: keys and values must be contiguous along (S, D)")
        G = Hq // Hkv
        G_PAD = max(16, triton.next_power_of_2(G))  # the rows of a tensor-core tile
        slices = slices_for(B, Hkv, S)
        keys_per_slice = triton.cdiv(triton.cdiv(S, slices), BLOCK_N) * BLOCK_N
        slices = triton.cdiv(S, keys_per_slice)
        acc = torch.empty(B, Hkv, slices, G_PAD, D, device=q.device, dtype=torch.float32)
        m = torch.empty(B, Hkv, slices, G_PAD, device=q.device, dtype=torch.float32)
        s = torch.empty_like(m)
        wrap_triton(_slices_kernel)[(B * Hkv, slices)](
            q.contiguous(),
            keys,
            values,
            visible.contiguous(),
            acc,
            m,
            s,
            S,
            D**-0.5,
            keys.stride(0),
            keys.stride(1),
            values.stride(0),
            values.stride(1),
            HKV=Hkv,
            G=G,
            G_PAD=G_PAD,
            D=D,
            SLICES=slices,
            KEYS_PER_SLICE=keys_per_slice,
            BLOCK_N=BLOCK_N,
            num_warps=4,
            num_stages=3,
        )
        return acc, m, s
