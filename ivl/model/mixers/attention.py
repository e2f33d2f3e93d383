"""Sliding-window attention: Qwen2.5-VL's grouped-query attention layer, restricted to a window of tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

from ivl.kernels.gemv import linear
from ivl.kernels.packed_bounds import FLA_CHUNK
from ivl.kernels.window_attention import (
    attention_at_positions,
    padded_window_attention,
    ring_decode_attention,
    sliding_window_attention,
    sliding_window_attention_after_prefix,
)
from ivl.model.cache import WindowKVCache
from ivl.model.layers import apply_rotary
from ivl.model.mixers.base import DecodeMatrix, TokenMixer

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig


EMPTY = -(2**62)  # token index of an empty slot of the static ring: never inside any window


class AttentionSizes(NamedTuple):
    """What attention's decode step needs to know of its shapes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


class SlidingWindowAttention(TokenMixer):
    """Parameter names follow transformers' Qwen2.5-VL attention, so teacher layers copy over unchanged."""

    label = "attention"

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window
        self.hidden_size = hidden = config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cu_seqlens: torch.Tensor | None = None,
        cache: WindowKVCache | None = None,
        token_index: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; rope (cos, sin) [B, T, head_dim]; token_index [T] gives each token's index in the
        stream (the window is counted in tokens, not in RoPE positions); attention_mask [B, T] is False/0 at
        padding tokens, which no query sees."""
        x = self.guard(x, cu_seqlens, cache, attention_mask)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if token_index is None:
            token_index = torch.arange(T, device=x.device)
        if (
            cache is not None
            and cache.keys is not None
            and cache.keys.shape[1] > 0
            and x.is_cuda
            and T >= 128
            and attention_mask is None
            and cache.all_valid
        ):
            # Chunked prefill without padding: the cached tokens are the ones just before this chunk, so in
            # token order they and the chunk form one band, which a block-sparse kernel skips outside of.
            # (Single decode tokens stay on the masked path below: the band's shape changes every step.)
            order = cache.positions.argsort()
            keys = torch.cat([cache.keys[:, order], k], dim=1)
            values = torch.cat([cache.values[:, order], v], dim=1)
            out = sliding_window_attention_after_prefix(q, keys, values, self.window)
        elif cache is not None and cache.keys is not None and cache.keys.shape[1] > 0:
            keys = torch.cat([cache.keys, k], dim=1)
            values = torch.cat([cache.values, v], dim=1)
            positions = torch.cat([cache.positions, token_index])
            valid = None
            if attention_mask is not None or not cache.all_valid:
                new_valid = attention_mask.bool() if attention_mask is not None else cache.valid.new_ones(B, T)
                valid = torch.cat([cache.valid, new_valid], dim=1)
            out = attention_at_positions(q, keys, values, token_index, positions, self.window, k_valid=valid)
        elif attention_mask is not None and not bool(attention_mask.all()):
            # Padding inside the batch (left-padded prompts). On GPUs: the real tokens as packed sequences (SDPA's
            # masked backward can return NaN there; ``padded_window_attention``). On CPUs, the explicit mask: one
            # [T, T] band per row, where packing would build a [B T, B T] one.
            if q.is_cuda:
                out = padded_window_attention(q, k, v, attention_mask, self.window)
            else:
                out = attention_at_positions(
                    q, k, v, token_index, token_index, self.window, k_valid=attention_mask.bool()
                )
        else:
            out = sliding_window_attention(q, k, v, self.window, cu_seqlens=cu_seqlens)
        if attention_mask is not None:
            # A padding query whose window holds only padding has no defined output, and CUDA's memory-efficient
            # kernel can leave it uninitialised (NaN): zero it, since a NaN value is NaN even under weight 0.
            out = out.masked_fill(~attention_mask.bool()[:, :, None, None], 0)
        if cache is not None:
            cache.update(k, v, token_index, attention_mask)
        return self.o_proj(out.reshape(B, T, -1))

    # ---- the mixer contract: cache and fixed-shape decoding ------------------------------------------------------
    def new_cache(self, window: int | None) -> WindowKVCache:
        return WindowKVCache(window)

    def static_buffers(self, batch: int, window: int, device, dtype) -> dict[str, torch.Tensor]:
        """A [B, Hkv, window, D] ring of keys/values (heads first: one head's keys form one matrix), with each row's
        token index and validity of each slot (rows run their own streams)."""
        shape = (batch, self.num_kv_heads, window, self.head_dim)
        return {
            "keys": torch.zeros(shape, device=device, dtype=dtype),
            "values": torch.zeros(shape, device=device, dtype=dtype),
            "positions": torch.full((batch, window), EMPTY, dtype=torch.long, device=device),
            "valid": torch.zeros(batch, window, dtype=torch.bool, device=device),
        }

    def load_static(self, buffers: dict[str, torch.Tensor], entry: WindowKVCache, shift: int = 0) -> None:
        """``shift``: the rows' tokens are renumbered to start after the first ``shift`` token indices (their left
        padding, which is left out): each token goes to the ring slot of its new index."""
        if entry.keys is None:
            return
        keep = entry.positions >= shift
        positions = entry.positions[keep] - shift
        slots = positions % buffers["positions"].shape[1]
        buffers["keys"][:, :, slots] = entry.keys[:, keep].transpose(1, 2)
        buffers["values"][:, :, slots] = entry.values[:, keep].transpose(1, 2)
        buffers["positions"][:, slots] = positions
        buffers["valid"][:, slots] = entry.valid[:, keep]

    def projection_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"mixer_in": [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]}
        if self.q_proj.bias is not None:
            groups["mixer_in_bias"] = [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]
        return groups

    def step_weights(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = {"w_in": packed["mixer_in"], "w_o": self.o_proj.weight}
        if "mixer_in_bias" in packed:
            weights["b_in"] = packed["mixer_in_bias"]
        return weights

    def step_sizes(self) -> AttentionSizes:
        return AttentionSizes(self.num_heads, self.num_kv_heads, self.head_dim)

    @staticmethod
    def step(x, weights, buffers, cos, sin, token_index, sizes: AttentionSizes) -> torch.Tensor:
        """One token per row against its ring, which takes the token in place; token_index [B]."""
        Hq, Hkv, D = sizes.num_heads, sizes.num_kv_heads, sizes.head_dim
        B = x.shape[0]
        keys, values, positions, valid = (buffers[n] for n in ("keys", "values", "positions", "valid"))
        window = positions.shape[1]
        q, k, v = linear(x, weights["w_in"], weights.get("b_in")).split([Hq * D, Hkv * D, Hkv * D], -1)
        q, k = apply_rotary(q.view(B, 1, Hq, D), cos, sin), apply_rotary(k.view(B, 1, Hkv, D), cos, sin)
        rows, slot = torch.arange(B, device=x.device), token_index % window
        keys[rows, :, slot] = k[:, 0]
        values[rows, :, slot] = v.view(B, Hkv, D)
        positions[rows, slot] = token_index
        valid[rows, slot] = True
        now = token_index[:, None]
        in_window = (positions > now - window) & (positions <= now)  # [B, S]
        out = ring_decode_attention(q, keys, values, in_window & valid)
        return linear(out.reshape(B, 1, Hq * D), weights["w_o"])

    # ---- the mixer contract: cost ------------------------------------------------------------------------------
    def decode_matrices(self) -> list[DecodeMatrix]:
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        return [
            DecodeMatrix("attention q/k/v", (Hq + 2 * Hkv) * D, self.hidden_size),
            DecodeMatrix("attention output", self.hidden_size, Hq * D),
        ]

    def core_flops_per_token(self, length: int, chunk: int = FLA_CHUNK) -> float:
        # Each query head: scores against the keys it sees and the sum of their values, 2 D per key each.
        return 4 * self.num_heads * self.head_dim * mean_keys_seen(length, self.window)


def mean_keys_seen(length: int, window: int | None) -> float:
    """Mean number of keys a causal query sees in a sequence of ``length`` tokens (itself included), at most
    ``window`` of them."""
    w = length if window is None else min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / length
