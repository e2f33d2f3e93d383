"""HybridLM: the hybrid language model. Embeddings -> blocks (mixer + SwiGLU MLP, pre-norm) -> norm -> LM head."""

from __future__ import annotations

import torch
import torch.nn as nn

from ivl.model.cache import HybridCache
from ivl.model.config import HybridConfig
from ivl.model.layers import MultimodalRotaryEmbedding, RMSNorm, SwiGLU
from ivl.model.mixers import mixer_class


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)). The mixer is the registered one ``layer_types`` names."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = mixer_class(self.layer_type)(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, cu_seqlens=None, cache=None, token_index=None, attention_mask=None) -> torch.Tensor:
        x = x + self.mixer(
            self.mixer_norm(x),
            rope=rope,
            cu_seqlens=cu_seqlens,
            cache=cache,
            token_index=token_index,
            attention_mask=attention_mask,
        )
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = MultimodalRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for block in self.layers:
            block.mixer.reset_mimic()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> HybridCache:
        return HybridCache([block.mixer.new_cache(self.config.window) for block in self.layers])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. See ``hidden_states`` for the arguments."""
        return self.lm_head(
            self.hidden_states(input_ids, inputs_embeds, position_ids, cu_seqlens, cache, attention_mask)
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden].

        Args:
            input_ids: [B, T] token ids (or inputs_embeds [B, T, hidden]).
            position_ids: RoPE positions, [3, B, T] (multimodal) or [B, T]; default: token index, restarting at
                each packed sequence.
            cu_seqlens: int32 [N + 1] boundaries of sequences packed along T (B == 1); nothing crosses them.
            cache: a ``HybridCache`` from ``new_cache()``: the call continues the cached stream and extends it.
            attention_mask: [B, T], 0 at padding tokens (left-padded prompts), which no other token sees. Right
                padding needs no mask: causality already hides it.
            token_index: [T], the tokens' indices in the stream (default: from ``cache.seen_tokens`` on). A captured
                CUDA graph passes it as a tensor, so that a replay reads the new indices instead of baked-in ones.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = h.shape
        start = cache.seen_tokens if cache is not None else 0
        if token_index is None:
            token_index = torch.arange(start, start + T, device=h.device)
        if position_ids is None:
            position_ids = default_position_ids(B, T, start, cu_seqlens, h.device)
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        rope = self.rotary(position_ids, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cu_seqlens, cache[i] if cache is not None else None, token_index, attention_mask)
        if cache is not None:
            cache.seen_tokens += T
        return self.norm(h)


def default_position_ids(B: int, T: int, start: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B, T] positions: start, start + 1, ...; restarting at 0 at each packed sequence when cu_seqlens is given."""
    pos = torch.arange(start, start + T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        pos = pos - cu[torch.bucketize(pos, cu[1:], right=True)]
    return pos[None].expand(B, -1)
