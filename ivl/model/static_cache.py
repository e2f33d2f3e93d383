"""Decoding with preallocated, fixed-shape cache buffers, so that one decode step can be captured in a CUDA graph.

``HybridCache`` grows its attention rings while the window fills and swaps tensors per step, which is right for
prefill but not capturable. ``StaticCache`` holds every buffer at its final shape from the start: per attention
layer a [B, Hkv, window, D] ring of keys/values (heads first: one head's keys form one matrix) with the token
index and validity of each slot, per Gated DeltaNet layer its state and convolution tails. ``decode_step``
updates them in place, reading the step's token index from a tensor, so the same kernels run on the same
addresses every step.
"""

from __future__ import annotations

import torch

from ivl.kernels.fused import fused
from ivl.model.cache import HybridCache, RecurrentCache, WindowKVCache
from ivl.model.gated_deltanet import GatedDeltaNet
from ivl.model.layers import apply_rotary
from ivl.model.lm import HybridLM

EMPTY = -(2**62)  # token index of an empty slot: never inside any window


class StaticCache:
    def __init__(self, lm: HybridLM, batch: int, device=None, dtype=None):
        config = lm.config
        if config.window is None:
            raise ValueError("a static cache needs a sliding window (full attention grows without bound)")
        device = device or lm.embed_tokens.weight.device
        dtype = dtype or lm.embed_tokens.weight.dtype
        S = self.window = config.window
        self.layers = []
        for block in lm.layers:
            m = block.mixer
            if isinstance(m, GatedDeltaNet):
                W = m.q_conv1d.kernel_size
                key, value = m.num_heads * m.head_k_dim, m.num_heads * m.head_v_dim
                self.layers.append({
                    "state": torch.zeros(batch, m.num_heads, m.head_k_dim, m.head_v_dim, device=device),
                    "q": torch.zeros(batch, W - 1, key, device=device, dtype=dtype),
                    "k": torch.zeros(batch, W - 1, key, device=device, dtype=dtype),
                    "v": torch.zeros(batch, W - 1, value, device=device, dtype=dtype),
                })
            else:
                self.layers.append({
                    "keys": torch.zeros(batch, m.num_kv_heads, S, m.head_dim, device=device, dtype=dtype),
                    "values": torch.zeros(batch, m.num_kv_heads, S, m.head_dim, device=device, dtype=dtype),
                    "positions": torch.full((S,), EMPTY, dtype=torch.long, device=device),
                    "valid": torch.zeros(batch, S, dtype=torch.bool, device=device),
                })

    @classmethod
    def from_cache(cls, lm: HybridLM, cache: HybridCache, batch: int) -> "StaticCache":
        """Copy a (prefilled) dynamic cache into static buffers."""
        static = cls(lm, batch)
        for buffers, layer in zip(static.layers, cache.layers):
            if isinstance(layer, RecurrentCache):
                if layer.state is not None:
                    buffers["state"].copy_(layer.state)
                    for name in ("q", "k", "v"):
                        buffers[name].copy_(layer.conv[name])
            elif isinstance(layer, WindowKVCache) and layer.keys is not None:
                slots = layer.positions % static.window
                buffers["keys"][:, :, slots] = layer.keys.transpose(1, 2)
                buffers["values"][:, :, slots] = layer.values.transpose(1, 2)
                buffers["positions"][slots] = layer.positions
                buffers["valid"][:, slots] = layer.valid
        return static

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


@torch.no_grad()
def decode_step(lm: HybridLM, cache: StaticCache, token: torch.Tensor, position: torch.Tensor,
                token_index: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] of one new token per row, updating ``cache`` in place.

    token [B]; position [3, B, 1] (multimodal RoPE position of the token); token_index: 0-dim long tensor, the
    token's index in the stream (the same for every row).
    """
    h = lm.embed_tokens(token[:, None])
    rope = lm.rotary(position, h.dtype)
    for block, buffers in zip(lm.layers, cache.layers):
        x = block.mixer_norm(h)
        if isinstance(block.mixer, GatedDeltaNet):
            mixed = _gdn_step(block.mixer, x, buffers)
        else:
            mixed = _attention_step(block.mixer, x, rope, buffers, token_index, cache.window)
        h = h + mixed
        h = h + block.mlp(block.mlp_norm(h))
    return lm.lm_head(lm.norm(h))[:, 0]


def _gdn_step(m: GatedDeltaNet, x: torch.Tensor, buffers: dict) -> torch.Tensor:
    step = RecurrentCache(state=buffers["state"], conv={k: buffers[k] for k in ("q", "k", "v")})
    out = m(x, cache=step)
    # the layer returns fresh tensors; write them back into the fixed buffers
    buffers["state"].copy_(step.state)
    for k in ("q", "k", "v"):
        buffers[k].copy_(step.conv[k])
    return out


def _attention_step(m, x, rope, buffers, token_index, window) -> torch.Tensor:
    B = x.shape[0]
    q = m.q_proj(x).view(B, 1, m.num_heads, m.head_dim)
    k = m.k_proj(x).view(B, 1, m.num_kv_heads, m.head_dim)
    v = m.v_proj(x).view(B, 1, m.num_kv_heads, m.head_dim)
    cos, sin = rope
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    slot = (token_index % window).view(1)
    buffers["keys"].index_copy_(2, slot, k.transpose(1, 2))
    buffers["values"].index_copy_(2, slot, v.transpose(1, 2))
    buffers["positions"].index_copy_(0, slot, token_index.view(1))
    buffers["valid"].index_fill_(1, slot, True)
    pos = buffers["positions"]
    mask = (pos > token_index - window) & (pos <= token_index)  # [S]
    out = _decode_attention(q, buffers["keys"], buffers["values"], mask[None] & buffers["valid"])
    return m.o_proj(out)


@fused
def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row over the ring: q [B, 1, Hq, D], keys/values [B, Hkv, S, D], mask [B, S] -> [B, 1, Hq * D].

    Two batched matrix products around a softmax, with the query heads of a key/value head as the rows of one
    product. SDPA's kernels run a single masked query per (row, head) block without splitting the keys, which
    reads the window at a small fraction of memory bandwidth.
    """
    B, _, Hq, D = q.shape
    Hkv = keys.shape[1]
    grouped = q.view(B, Hkv, Hq // Hkv, D)  # query head h reads key/value head h // (Hq / Hkv)
    scores = (grouped @ keys.transpose(-1, -2)).float() * D**-0.5  # [B, Hkv, G, S]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1).to(values.dtype) @ values  # [B, Hkv, G, D]
    return out.reshape(B, 1, Hq * D)
