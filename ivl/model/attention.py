"""Sliding-window attention: Qwen2.5-VL's grouped-query attention layer, restricted to a window of tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ivl.kernels import sliding_window_attention
from ivl.kernels.window_attention import attention_at_positions, sliding_window_attention_after_prefix
from ivl.model.cache import WindowKVCache
from ivl.model.layers import apply_rotary

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig


class SlidingWindowAttention(nn.Module):
    """Parameter names follow transformers' Qwen2.5-VL attention, so teacher layers copy over unchanged."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window
        hidden, bias = config.hidden_size, config.attention_bias
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
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None and cu_seqlens is not None:
            raise ValueError("a cache holds one stream per batch row; pass padded batches, not cu_seqlens")
        if token_index is None:
            token_index = torch.arange(T, device=x.device)
        if (cache is not None and cache.keys is not None and cache.keys.shape[1] > 0 and x.is_cuda and T >= 128
                and attention_mask is None and cache.all_valid):
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
            # Padding inside the batch (left-padded prompts): the explicit-mask path.
            out = attention_at_positions(q, k, v, token_index, token_index, self.window,
                                         k_valid=attention_mask.bool())
        else:
            out = sliding_window_attention(q, k, v, self.window, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.update(k, v, token_index, attention_mask)
        return self.o_proj(out.reshape(B, T, -1))
