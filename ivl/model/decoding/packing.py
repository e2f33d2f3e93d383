"""One weight matrix per group of projections that read the same input, for decoding.

A decode step multiplies one token by every weight of the model, so it is bound by how fast the weights stream
from memory. Matrix-vector products over small matrices (Gated DeltaNet's a/b projections have 16 rows, attention's
k/v 256) run far below memory bandwidth, and each is one more kernel launch. Reading q/k/v/g/a/b (or gate/up) as
one matrix is one launch that streams at the bandwidth of a large product.

``pack_projections`` moves each group's weights into one contiguous matrix and makes the original parameters views
of its row blocks, so nothing is copied twice in memory and the modules (training, prefill, checkpoints) keep
seeing their own parameters with the same values. Call it again after anything that reallocates parameters
(``.to()``, loading with ``assign=True``): it re-packs whatever is no longer packed.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def pack_projections(lm: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per block of ``lm``: each of its mixer's ``projection_groups`` as one matrix, and "gate_up" (the MLP's
    [gate; up] rows). E.g. Gated DeltaNet's "mixer_in" = [q; k; v; g; a; b] rows and "conv" = its three
    convolutions' taps; attention's "mixer_in" = [q; k; v] and "mixer_in_bias"."""
    packed = []
    for block in lm.layers:
        entry = {name: _pack(params) for name, params in block.mixer.projection_groups().items()}
        entry["gate_up"] = _pack([block.mlp.gate_proj.weight, block.mlp.up_proj.weight])
        packed.append(entry)
    return packed


@torch.no_grad()
def _pack(params: list[nn.Parameter]) -> torch.Tensor:
    """One tensor whose leading-dimension blocks are ``params`` (which become views of it)."""
    first = params[0]
    base = first.data
    if base.storage_offset() == 0 and base.is_contiguous():
        # Already packed if every parameter is the next block of the first one's storage.
        offset, whole = 0, True
        for p in params:
            whole &= (
                p.data.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                and p.data.storage_offset() == offset
                and p.data.is_contiguous()
            )
            offset += p.numel()
        if whole and base.untyped_storage().nbytes() >= offset * base.element_size():
            return base.as_strided((sum(p.shape[0] for p in params), *first.shape[1:]), base.stride())
    matrix = torch.cat([p.data for p in params], dim=0)
    start = 0
    for p in params:
        p.data = matrix[start : start + p.shape[0]]
        start += p.shape[0]
    return matrix
