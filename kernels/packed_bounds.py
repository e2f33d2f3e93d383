"""The boundaries of a packed batch (``cu_seqlens``) as host integers, read from the device once per batch.

Reading a CUDA tensor on the host waits for every kernel queued before it. Each mixer needs the boundaries on the
host (to check them, to build FlexAttention's block mask, for flash-attn's longest sequence), so reading them in
every layer stalled the host once per layer: the host could then never run ahead of the GPU, and under FSDP each
block's all-gather was issued only when the previous block had nearly finished instead of overlapping with it.

The last tensor read is remembered by identity (the way fla's ``tensor_cache`` keeps its index tensors): every layer
of one forward, and the recomputation of checkpointed blocks in the backward, receive the same ``cu_seqlens``
object, so only the first read waits. A ``cu_seqlens`` must not be modified in place after it has been read.
"""

from __future__ import annotations

import torch

_last: tuple[torch.Tensor, tuple[int, ...]] | None = None


def host_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``tuple(cu_seqlens.tolist())``, read from the device only when ``cu_seqlens`` is not the last tensor read."""
    global _last
    if _last is None or _last[0] is not cu_seqlens:
        _last = (cu_seqlens, tuple(cu_seqlens.tolist()))
    return _last[1]
