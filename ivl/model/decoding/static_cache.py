"""Decoding with preallocated, fixed-shape cache buffers, so that one decode step can be captured in a CUDA graph.

``HybridCache`` grows its attention rings while the window fills and swaps tensors per step, which is right for
prefill but not capturable. ``StaticCache`` holds every buffer at its final shape from the start (each mixer's
``static_buffers``: an attention layer's ring of keys/values, a linear mixer's state and convolution tails).
``decode_step`` updates them in place, reading the step's token index from a tensor, so the same kernels run on
the same addresses every step.

A block's step is the mixer's own ``step`` (a pure function over tensors that reads the projections packed by
``pack_projections``: one product per group instead of up to six) between the block's norms and its MLP. On
CUDA each block is one compiled graph, the same for every layer of its type, in which norms, convolutions, gates,
state updates and attention fuse into a few kernels around the matrix products, which at batch 1 are
``ivl.kernels.gemv``'s matrix-vector kernel. The CPU tests hold it to the modules' cached forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ivl.kernels.fused import fused
from ivl.kernels.gemv import linear
from ivl.model.cache import HybridCache
from ivl.model.decoding.packing import pack_projections
from ivl.model.layers import rms_norm
from ivl.model.lm import HybridLM


class StaticCache:
    """Every layer's decoding buffers for ``batch`` rows (the batch first in every buffer), each row its own stream
    at its own token index. ``ring``: the attention rings' size, the window (or, for full attention, the longest
    context a row may reach)."""

    def __init__(self, lm: HybridLM, batch: int, device=None, dtype=None, ring: int | None = None):
        config = lm.config
        ring = config.window or ring
        if ring is None:
            raise ValueError("a static cache of full attention needs its ring size: the longest context it holds")
        device = device or lm.embed_tokens.weight.device
        dtype = dtype or lm.embed_tokens.weight.dtype
        self.window = ring
        self.batch, self.device, self.blocks = batch, torch.device(device), list(lm.layers)
        self.layers = [block.mixer.static_buffers(batch, ring, device, dtype) for block in lm.layers]

    @classmethod
    def from_cache(
        cls, lm: HybridLM, cache: HybridCache, batch: int | None = None, ring: int | None = None
    ) -> StaticCache:
        """Copy a (prefilled) dynamic cache into static buffers."""
        static = cls(lm, batch or _rows(cache), ring=ring)
        for block, buffers, entry in zip(lm.layers, static.layers, cache.layers):
            block.mixer.load_static(buffers, entry)
        return static

    def rows(self, n: int) -> StaticCache:
        """The first ``n`` rows, as a cache sharing these buffers (what a decoder of ``n`` rows reads and writes)."""
        view = object.__new__(StaticCache)
        view.window, view.batch, view.device, view.blocks = self.window, n, self.device, self.blocks
        view.layers = [{name: t[:n] for name, t in layer.items()} for layer in self.layers]
        return view

    def clone(self) -> StaticCache:
        """A copy with buffers of its own."""
        copy = object.__new__(StaticCache)
        copy.window, copy.batch, copy.device, copy.blocks = self.window, self.batch, self.device, self.blocks
        copy.layers = [{name: t.clone() for name, t in layer.items()} for layer in self.layers]
        return copy

    def load(self, slot: int, cache: HybridCache, shift: int = 0) -> None:
        """A one-row dynamic cache into row ``slot``; ``shift``: its first ``shift`` token indices were left padding,
        left out, so that its tokens count from its first real one."""
        for block, buffers, entry in zip(self.blocks, self.layers, cache.layers):
            block.mixer.load_static({name: t[slot : slot + 1] for name, t in buffers.items()}, entry, shift)

    def move_row(self, src: int, dst: int) -> None:
        for layer in self.layers:
            for t in layer.values():
                t[dst].copy_(t[src])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


def _rows(cache: HybridCache) -> int:
    for layer in cache.layers:
        for t in layer.tensors():
            if t.dim() > 1:
                return t.shape[0]
    raise ValueError("the cache holds nothing yet: say how many rows")


@torch.no_grad()
def decode_step(
    lm: HybridLM, cache: StaticCache, token: torch.Tensor, position: torch.Tensor, token_index: torch.Tensor
) -> torch.Tensor:
    """Logits [B, vocab] of one new token per row, updating ``cache`` in place.

    token [B]; position [3, B, 1] (multimodal RoPE position of the token); token_index [B] (or 0-dim, the same for
    every row): the token's index in its row's stream.
    """
    eps = lm.config.rms_norm_eps
    token_index = token_index.expand(token.shape[0]) if token_index.dim() == 0 else token_index
    h = lm.embed_tokens(token[:, None])
    cos, sin = lm.rotary(position, h.dtype)
    for block, buffers, packed in zip(lm.layers, cache.layers, pack_projections(lm)):
        m = block.mixer
        h = _block_step(
            h,
            block.mixer_norm.weight,
            block.mlp_norm.weight,
            m.step_weights(packed),
            buffers,
            cos,
            sin,
            token_index,
            packed["gate_up"],
            block.mlp.down_proj.weight,
            eps,
            type(m).step,
            m.step_sizes(),
        )
    return _head(h, lm.norm.weight, lm.lm_head.weight, eps)


@fused(dynamic=False)
def _block_step(
    h,
    mixer_norm,
    mlp_norm,
    weights,
    buffers,
    cos,
    sin,
    token_index,
    w_gate_up,
    w_down,
    eps: float,
    step,
    sizes: NamedTuple,
) -> torch.Tensor:
    """h [B, 1, hidden] after one block: x + mixer step(norm(x)), then x + mlp(norm(x)); ``buffers`` advance in
    place. ``sizes``: the mixer's ``step_sizes()``, Python numbers that the compiled graph takes as constants."""
    h = h + step(rms_norm(h, mixer_norm, eps), weights, buffers, cos, sin, token_index, sizes)
    gate, up = linear(rms_norm(h, mlp_norm, eps), w_gate_up).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, w_down)


@fused(dynamic=False)
def _head(h, norm, w_head, eps: float) -> torch.Tensor:
    return linear(rms_norm(h, norm, eps), w_head)[:, 0]
