"""The boundaries of a packed batch (``cu_seqlens``) as host integers, read from the device at most once per batch.

Reading a CUDA tensor on the host waits for every kernel queued before it. Each mixer needs the boundaries on the
host (to check them, to build FlexAttention's block mask, for flash-attn's longest sequence), so reading them in
every layer stalled the host once per layer: the host could then never run ahead of the GPU, and under FSDP each
block's all-gather was issued only when the previous block had nearly finished instead of overlapping with it.

The last tensor read is remembered by identity (the way fla's ``tensor_cache`` keeps its index tensors): every layer
of one forward, and the recomputation of checkpointed blocks in the backward, receive the same ``cu_seqlens``
object, so only the first read waits. Where the host built the batch it already knows the boundaries: give them
with ``set_host_bounds`` when the batch reaches the GPU and no read waits at all. A ``cu_seqlens`` must not be
modified in place after its bounds have been read or set.
"""

from __future__ import annotations

import torch

FLA_CHUNK = 64
"""The chunk length of fla's chunked kernels (gated delta rule, GLA, the short convolution): their default."""

_last: tuple[torch.Tensor, tuple[int, ...]] | None = None
_last_chunks: tuple[torch.Tensor, int, torch.Tensor] | None = None


def host_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``tuple(cu_seqlens.tolist())``, read from the device only when ``cu_seqlens`` is not the last tensor read."""
    global _last
    if _last is None or _last[0] is not cu_seqlens:
        _last = (cu_seqlens, tuple(cu_seqlens.tolist()))
    return _last[1]


def set_host_bounds(cu_seqlens: torch.Tensor, bounds) -> None:
    """Make ``host_bounds(cu_seqlens)`` return ``bounds`` (the same values, known on the host) without reading it."""
    global _last
    _last = (cu_seqlens, tuple(int(b) for b in bounds))


def chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[chunks, 2] (sequence, chunk within it) of every ``chunk_size``-token chunk of the packed sequences, on
    ``cu_seqlens``' device and dtype: what fla's ``prepare_chunk_indices`` builds, but from the host bounds and
    copied without waiting (fla's own reads the device's lengths back once per batch). Kept for the last
    ``cu_seqlens`` like ``host_bounds``: the short convolutions and the gated delta rule of every layer share it."""
    global _last_chunks
    if _last_chunks is None or _last_chunks[0] is not cu_seqlens or _last_chunks[1] != chunk_size:
        bounds = host_bounds(cu_seqlens)
        rows = [
            (n, c) for n, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])) for c in range(-(-(z - a) // chunk_size))
        ]
        _last_chunks = (
            cu_seqlens,
            chunk_size,
            to_device(torch.tensor(rows, dtype=cu_seqlens.dtype).reshape(-1, 2), cu_seqlens.device),
        )
    return _last_chunks[2]


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without the host waiting for the GPU: a copy from pageable memory synchronises
    the stream, one from pinned memory is queued like a kernel."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
