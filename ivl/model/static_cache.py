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

import torch
import torch.nn.functional as F

from ivl.kernels.fused import fused
from ivl.kernels.gemv import linear
from ivl.model.cache import HybridCache
from ivl.model.layers import rms_norm
from ivl.model.lm import HybridLM
from ivl.model.packing import pack_projections


class StaticCache:
    def __init__(self, lm: HybridLM, batch: int, device=None, dtype=None):
        config = lm.config
        if config.window is None:
            raise ValueError("a static cache needs a sliding window (full attention grows without bound)")
        device = device or lm.embed_tokens.weight.device
        dtype = dtype or lm.embed_tokens.weight.dtype
        self.window = config.window
        self.batch, self.device = batch, torch.device(device)
        self.layers = [block.mixer.static_buffers(batch, self.window, device, dtype) for block in lm.layers]

    @classmethod
    def from_cache(cls, lm: HybridLM, cache: HybridCache, batch: int) -> "StaticCache":
        """Copy a (prefilled) dynamic cache into static buffers."""
        static = cls(lm, batch)
        for block, buffers, entry in zip(lm.layers, static.layers, cache.layers):
            block.mixer.load_static(buffers, entry)
        return static

    def clone(self) -> "StaticCache":
        """A copy with buffers of its own."""
        copy = object.__new__(StaticCache)
        copy.window, copy.batch, copy.device = self.window, self.batch, self.device
        copy.layers = [{name: t.clone() for name, t in layer.items()} for layer in self.layers]
        return copy

    def copy_from(self, source: "StaticCache") -> None:
        """Take ``source``'s contents in place (a batch of at most this one's rows), so that a captured decoder
        can serve another batch. Rows beyond ``source``'s repeat its first row: placeholders whose outputs nobody
        reads, which hold nothing of an earlier batch."""
        if source.batch > self.batch or source.window != self.window:
            raise ValueError(f"a cache of {source.batch} rows (window {source.window}) does not fit one of "
                             f"{self.batch} rows (window {self.window})")
        for mine, theirs in zip(self.layers, source.layers):
            for name, dst in mine.items():
                src = theirs[name]
                if dst.shape == src.shape:  # shared across rows (ring positions), or as many rows
                    dst.copy_(src)
                else:
                    dst[:source.batch].copy_(src)
                    dst[source.batch:].copy_(src[:1].expand_as(dst[source.batch:]))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


@torch.no_grad()
def decode_step(lm: HybridLM, cache: StaticCache, token: torch.Tensor, position: torch.Tensor,
                token_index: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] of one new token per row, updating ``cache`` in place.

    token [B]; position [3, B, 1] (multimodal RoPE position of the token); token_index: 0-dim long tensor, the
    token's index in the stream (the same for every row).
    """
    eps = lm.config.rms_norm_eps
    h = lm.embed_tokens(token[:, None])
    cos, sin = lm.rotary(position, h.dtype)
    for block, buffers, packed in zip(lm.layers, cache.layers, pack_projections(lm)):
        m = block.mixer
        h = _block_step(h, block.mixer_norm.weight, block.mlp_norm.weight, m.step_weights(packed), buffers, cos,
                        sin, token_index, packed["gate_up"], block.mlp.down_proj.weight, eps, type(m).step,
                        m.step_sizes())
    return _head(h, lm.norm.weight, lm.lm_head.weight, eps)


@fused(dynamic=False)
def _block_step(h, mixer_norm, mlp_norm, weights, buffers, cos, sin, token_index, w_gate_up, w_down, eps: float,
                step, sizes: tuple) -> torch.Tensor:
    """h [B, 1, hidden] after one block: x + mixer step(norm(x)), then x + mlp(norm(x)); ``buffers`` advance in
    place."""
    h = h + step(rms_norm(h, mixer_norm, eps), weights, buffers, cos, sin, token_index, sizes)
    gate, up = linear(rms_norm(h, mlp_norm, eps), w_gate_up).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, w_down)


@fused(dynamic=False)
def _head(h, norm, w_head, eps: float) -> torch.Tensor:
    return linear(rms_norm(h, norm, eps), w_head)[:, 0]
