"""What a training step would otherwise read back from the GPU, computed on the host while the batch is still there.

Every read of a CUDA tensor on the host (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing, a copy from
pageable memory) waits for every kernel queued before it. A step that waits can no longer run ahead of the GPU,
and where the host is the slower side (Python per layer and per fla call) the GPU then idles, for a sizeable share
of a multi-GPU step (docs/benchmarks.md). So the
stages compute here, from the CPU batch (Lightning's ``on_before_batch_transfer``): the multimodal position ids,
the positions the losses score, the number of tokens that is logged and the packed boundaries; an all-ones
attention mask is dropped (the same as none, without the check on the GPU), and the tensors are pinned so that
their copies to the GPU are queued rather than waited for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ivl.kernels import packed_bounds
from ivl.model.training.losses import label_positions

HOST_BOUNDS = "cu_seqlens_on_host"


def prepare(batch: dict, position_ids: Callable | None = None, pin: bool = False) -> dict:
    """The batch with ``position_ids`` (from ``position_ids(input_ids, image_grid_thw, video_grid_thw,
    second_per_grid_ts, attention_mask, cu_seqlens)``, e.g. ``InfiniteVL.position_ids``, unless given),
    ``label_positions`` (with labels), ``tokens`` (an int) and the host copy of ``cu_seqlens``; pinned if ``pin``."""
    if not isinstance(batch.get("input_ids"), torch.Tensor):  # every sample skipped, or not a token batch
        return batch
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        del batch["attention_mask"]
        mask = None
    if position_ids is not None and "position_ids" not in batch:
        batch["position_ids"], _ = position_ids(
            ids,
            batch.get("image_grid_thw"),
            batch.get("video_grid_thw"),
            batch.get("second_per_grid_ts"),
            mask,
            batch.get("cu_seqlens"),
        )
    if batch.get("labels") is not None:
        batch["label_positions"] = label_positions(batch["labels"], batch.get("cu_seqlens"))
    batch["tokens"] = count_tokens(batch)
    if batch.get("cu_seqlens") is not None:
        batch[HOST_BOUNDS] = tuple(batch["cu_seqlens"].tolist())
    if pin:
        batch = {k: _pinned(v) for k, v in batch.items()}
    return batch


def count_tokens(batch: dict) -> int:
    """Real (unpadded) tokens in a batch: the host's count where ``prepare`` made one, else from the mask."""
    if "tokens" in batch:
        return batch["tokens"]
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def arrived(batch: dict) -> dict:
    """After the copy to the device: the layers' ``host_bounds(cu_seqlens)`` is what the host already knew."""
    bounds = batch.pop(HOST_BOUNDS, None)
    if bounds is not None:
        packed_bounds.set_host_bounds(batch["cu_seqlens"], bounds)
    return batch


def _pinned(value):
    if isinstance(value, torch.Tensor):
        return value if value.is_pinned() else value.pin_memory()
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_pinned(v) for v in value)
    return value
