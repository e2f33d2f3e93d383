"""A wide value head as several narrow ones sharing its query and key: the grouped-value layout of fla and FlashQLA.

The gated delta rule updates each row of a head's [K, V] state (one value channel) on its own: the decay, the
write strength and the key act on all rows alike and the value only on its own row. A head with V = n * width
channels is therefore exactly n heads of ``width`` channels with the same q, k, g and beta. fla's grouped-value
convention ("GVA": value head i reads query/key head i // (HV / H)) expresses that without copying q and k.

InfiniteVL's Gated DeltaNet (16 heads, K = 128, V = 256) written this way is 16 key heads and 32 value heads of
128, Qwen3-Next's shape, the one FlashQLA's fused kernels (K = V = 128 only) and FlashInfer's are built for.
"""

from __future__ import annotations


def split_value_heads(v, g, beta, initial_state, width: int):
    """[B, T, H, n * width] values (g, beta [B, T, H], state [N, H, K, n * width]) as H * n heads of ``width``:
    value head h * n + j holds channels j * width ... (j + 1) * width of head h."""
    B, T, H, V = v.shape
    n = V // width
    v = v.reshape(B, T, H * n, width)
    g, beta = g.repeat_interleave(n, dim=2), beta.repeat_interleave(n, dim=2)
    if initial_state is not None:
        N, _, K, _ = initial_state.shape
        initial_state = initial_state.reshape(N, H, K, n, width).transpose(2, 3).reshape(N, H * n, K, width)
    return v, g, beta, initial_state


def merge_value_heads(o, state, heads: int):
    """Undo ``split_value_heads`` on the output [B, T, H * n, width] and final state [N, H * n, K, width]."""
    B, T, HV, width = o.shape
    n = HV // heads
    o = o.reshape(B, T, heads, n * width)
    if state is not None:
        N, _, K, _ = state.shape
        state = state.reshape(N, heads, n, K, width).transpose(2, 3).reshape(N, heads, K, n * width)
    return o, state


def splits(head_v_dim: int, width: int | None) -> bool:
    """Whether a value head this wide is split into heads of ``width`` (None: never)."""
    return width is not None and head_v_dim > width and head_v_dim % width == 0
