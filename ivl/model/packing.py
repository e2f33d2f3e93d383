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

from ivl.model.gated_deltanet import GatedDeltaNet


def pack_projections(lm: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per block of ``lm``: {"mixer_in", ["mixer_in_bias"], ["conv"], "gate_up"} packed matrices (see module doc).

    GDN blocks: mixer_in = [q; k; v; g; a; b] rows, conv = the q/k/v short-convolution taps [2K + V, W].
    Attention blocks: mixer_in = [q; k; v] with its bias. Every block: gate_up = [gate; up] of the MLP.
    """
    packed = []
    for block in lm.layers:
        m = block.mixer
        if isinstance(m, GatedDeltaNet):
            entry = {
                "mixer_in": _pack([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.g_proj.weight,
                                   m.a_proj.weight, m.b_proj.weight]),
                # conv weights are [C, 1, W]: packed along C, then seen as [C, W]
                "conv": _pack([m.q_conv1d.weight, m.k_conv1d.weight, m.v_conv1d.weight])[:, 0],
            }
        else:
            entry = {"mixer_in": _pack([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight])}
            if m.q_proj.bias is not None:
                entry["mixer_in_bias"] = _pack([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias])
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
            whole &= (p.data.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                      and p.data.storage_offset() == offset and p.data.is_contiguous())
            offset += p.numel()
        if whole and base.untyped_storage().nbytes() >= offset * base.element_size():
            return base.as_strided((sum(p.shape[0] for p in params), *first.shape[1:]), base.stride())
    matrix = torch.cat([p.data for p in params], dim=0)
    start = 0
    for p in params:
        p.data = matrix[start:start + p.shape[0]]
        start += p.shape[0]
    return matrix
