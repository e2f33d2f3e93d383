"""Decoding with preallocated, fixed-shape cache buffers, so that one decode step can be captured in a CUDA graph.

``HybridCache`` grows its attention rings while the window fills and swaps tensors per step, which is right for
prefill but not capturable. ``StaticCache`` holds every buffer at its final shape from the start: per attention
layer a [B, Hkv, window, D] ring of keys/values (heads first: one head's keys form one matrix) with the token
index and validity of each slot, per Gated DeltaNet layer its state and the q/k/v convolution tails side by side.
``decode_step`` updates them in place, reading the step's token index from a tensor, so the same kernels run on
the same addresses every step.

The step is written once more here, as one function per block type over plain tensors, rather than by calling
the modules: it reads the projections packed by ``pack_projections`` (one product per group instead of up to
six), and on CUDA each block is one compiled graph, the same for every layer of its type, in which the norms,
convolution, gates, delta-rule update and attention fuse into a few kernels around the matrix products, which at
batch 1 are ``ivl.kernels.gemv``'s matrix-vector kernel. The CPU tests hold it to the modules' cached forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ivl.kernels.fused import fused
from ivl.kernels.gated_delta import gated_delta_step
from ivl.kernels.gemv import linear
from ivl.model.cache import HybridCache, RecurrentCache, WindowKVCache
from ivl.model.gated_deltanet import GatedDeltaNet, _gates, _l2norm
from ivl.model.layers import apply_rotary, gated_rms_norm, rms_norm
from ivl.model.lm import HybridLM
from ivl.model.packing import pack_projections

EMPTY = -(2**62)  # token index of an empty slot: never inside any window


class StaticCache:
    def __init__(self, lm: HybridLM, batch: int, device=None, dtype=None):
        config = lm.config
        if config.window is None:
            raise ValueError("a static cache needs a sliding window (full attention grows without bound)")
        device = device or lm.embed_tokens.weight.device
        dtype = dtype or lm.embed_tokens.weight.dtype
        S = self.window = config.window
        self.batch, self.device = batch, torch.device(device)
        self.layers = []
        for block in lm.layers:
            m = block.mixer
            if isinstance(m, GatedDeltaNet):
                W = m.q_conv1d.kernel_size
                channels = m.num_heads * (2 * m.head_k_dim + m.head_v_dim)  # q, k, v side by side
                self.layers.append({
                    "state": torch.zeros(batch, m.num_heads, m.head_k_dim, m.head_v_dim, device=device),
                    "tail": torch.zeros(batch, W - 1, channels, device=device, dtype=dtype),
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
                    buffers["tail"].copy_(torch.cat([layer.conv[name] for name in ("q", "k", "v")], dim=-1))
            elif isinstance(layer, WindowKVCache) and layer.keys is not None:
                slots = layer.positions % static.window
                buffers["keys"][:, :, slots] = layer.keys.transpose(1, 2)
                buffers["values"][:, :, slots] = layer.values.transpose(1, 2)
                buffers["positions"][slots] = layer.positions
                buffers["valid"][:, slots] = layer.valid
        return static

    def clone(self) -> "StaticCache":
        """A copy with buffers of its own."""
        copy = object.__new__(StaticCache)
        copy.window, copy.batch, copy.device = self.window, self.batch, self.device
        copy.layers = [{name: t.clone() for name, t in layer.items()} for layer in self.layers]
        return copy

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
        norms = (block.mixer_norm.weight, block.mlp_norm.weight)
        mlp = (packed["gate_up"], block.mlp.down_proj.weight)
        if isinstance(m, GatedDeltaNet):
            h = _gdn_block_step(h, *norms, packed["mixer_in"], packed["conv"], buffers["tail"], buffers["state"],
                                m.A_log, m.dt_bias, m.o_norm.weight, m.o_proj.weight, *mlp, eps, m.num_heads,
                                m.head_k_dim, m.head_v_dim)
        else:
            h = _attention_block_step(h, *norms, packed["mixer_in"], packed.get("mixer_in_bias"), cos, sin,
                                      buffers["keys"], buffers["values"], buffers["positions"], buffers["valid"],
                                      token_index, m.o_proj.weight, *mlp, eps, m.num_heads, m.num_kv_heads,
                                      m.head_dim, cache.window)
    return _head(h, lm.norm.weight, lm.lm_head.weight, eps)


@fused(dynamic=False)
def _gdn_block_step(h, mixer_norm, mlp_norm, w_in, conv_w, tail, state, A_log, dt_bias, o_norm, w_o, w_gate_up,
                    w_down, eps: float, H: int, K: int, V: int) -> torch.Tensor:
    """h [B, 1, hidden] after one Gated DeltaNet block; ``tail`` and ``state`` advance in place."""
    B = h.shape[0]
    q, k, v, gate, a, b = linear(rms_norm(h, mixer_norm, eps), w_in).split([H * K, H * K, H * V, H * V, H, H], -1)
    # The short convolutions of q, k and v at once: tap W-1 on this token, the others on the tail.
    window = torch.cat([tail, torch.cat([q, k, v], dim=-1)], dim=1)  # [B, W, 2HK + HV]
    conv = F.silu((window * conv_w.t()).sum(1, keepdim=True))
    tail.copy_(window[:, 1:])
    q, k, v = conv.split([H * K, H * K, H * V], -1)
    q, k = _l2norm(q.view(B, 1, H, K)), _l2norm(k.view(B, 1, H, K))
    g, beta = _gates(a, b, A_log, dt_bias)
    o = gated_delta_step(q, k, v.view(B, 1, H, V), g, beta, K**-0.5, state)
    o = gated_rms_norm(o, gate.view(B, 1, H, V), o_norm, eps)
    h = h + linear(o.reshape(B, 1, H * V), w_o)
    return _mlp(h, mlp_norm, w_gate_up, w_down, eps)


@fused(dynamic=False)
def _attention_block_step(h, mixer_norm, mlp_norm, w_in, b_in, cos, sin, keys, values, positions, valid,
                          token_index, w_o, w_gate_up, w_down, eps: float, Hq: int, Hkv: int, D: int,
                          window: int) -> torch.Tensor:
    """h [B, 1, hidden] after one sliding-window attention block; the ring buffers take this token in place."""
    B = h.shape[0]
    q, k, v = linear(rms_norm(h, mixer_norm, eps), w_in, b_in).split([Hq * D, Hkv * D, Hkv * D], -1)
    q, k = apply_rotary(q.view(B, 1, Hq, D), cos, sin), apply_rotary(k.view(B, 1, Hkv, D), cos, sin)
    slot = (token_index % window).view(1)
    keys.index_copy_(2, slot, k.transpose(1, 2))
    values.index_copy_(2, slot, v.view(B, 1, Hkv, D).transpose(1, 2))
    positions.index_copy_(0, slot, token_index.view(1))
    valid.index_fill_(1, slot, True)
    in_window = (positions > token_index - window) & (positions <= token_index)  # [S]
    out = _decode_attention(q, keys, values, in_window[None] & valid)
    h = h + linear(out, w_o)
    return _mlp(h, mlp_norm, w_gate_up, w_down, eps)


def _mlp(h, norm, w_gate_up, w_down, eps):
    gate, up = linear(rms_norm(h, norm, eps), w_gate_up).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, w_down)


@fused(dynamic=False)
def _head(h, norm, w_head, eps: float) -> torch.Tensor:
    return linear(rms_norm(h, norm, eps), w_head)[:, 0]


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
