"""The token-mixer registry and the contract every mixer implements.

A layer type names a mixer (``HybridConfig.layer_types``). The language model, the caches, the projection
packing, the static decoder and the conversion call the mixer through the methods of ``TokenMixer`` and never
test its class, so adding a mixer is one file that implements them and one line in ``MIXERS``.

The registry maps names to import paths, resolved on first use: ``HybridConfig`` validates names against it
without importing the layers (which import the config).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn as nn

from ivl.model.cache import RecurrentCache

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig

MIXERS = {
    "attention": "ivl.model.attention:SlidingWindowAttention",
    "gated_deltanet": "ivl.model.gated_deltanet:GatedDeltaNet",
    "mamba2": "ivl.model.mamba2:Mamba2",
    "gla": "ivl.model.gla:GatedLinearAttention",
    "linear_attention": "ivl.model.linear_attention:LinearAttention",
}
LINEAR_MIXERS = tuple(name for name in MIXERS if name != "attention")
"""The constant-memory mixers: the ones ``hybrid_ratio`` places between the attention layers."""
ALIASES = {"gdn": "gated_deltanet"}


def canonical_name(name: str) -> str:
    """A registered mixer name (aliases such as "gdn" resolved), or a ValueError that lists the choices."""
    name = ALIASES.get(name, name)
    if name not in MIXERS:
        raise ValueError(f"{name!r} is not a known mixer; choose from {sorted(MIXERS)} (or {sorted(ALIASES)})")
    return name


def mixer_class(name: str) -> type["TokenMixer"]:
    module, attribute = MIXERS[canonical_name(name)].split(":")
    return getattr(importlib.import_module(module), attribute)


StepFunction = Callable[..., torch.Tensor]


class TokenMixer(nn.Module):
    """What every token mixer provides.

    Forward (training, prefill, chunked prefill, decoding through the dynamic cache):
        ``forward(x, rope, cu_seqlens, cache, token_index, attention_mask)``: x [B, T, hidden] -> [B, T, hidden];
        packed sequences (``cu_seqlens``, B = 1) never mix; left padding (``attention_mask`` 0) leaves no trace
        in what the row's real tokens see; with a cache entry from ``new_cache`` the call continues its stream and extends it.
    Fixed-shape decoding (the static cache and the CUDA-graph decoder):
        ``static_buffers`` allocates the buffers of one layer at their final shape, ``load_static`` copies a
        dynamic cache entry into them, and ``step`` (a pure function over tensors, compiled into one graph per
        block on CUDA) advances them by one token in place. ``step_weights`` and ``step_sizes`` are its inputs.
    Packing: ``projection_groups`` names the weights that read the same input, to be stored as one matrix.
    Initialisation: ``reset_mimic`` after the model's generic initialisation (InfiniteVL's near pass-through for
    the linear mixers); ``from_attention`` maps parameters that conversion may copy from the attention layer
    being replaced (``gdn_init="attention"``), to the teacher's attention parameter names.
    """

    from_attention: ClassVar[dict[str, str]] = {}
    step: ClassVar[StepFunction]
    """step(x [B, 1, hidden] normed, weights, buffers, cos, sin, token_index, sizes) -> [B, 1, hidden]."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def new_cache(self, window: int | None):
        raise NotImplementedError

    def static_buffers(self, batch: int, window: int, device, dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_static(self, buffers: dict[str, torch.Tensor], entry, shift: int = 0) -> None:
        """Copy a dynamic cache entry into the buffers; ``shift``: the first ``shift`` token indices were left
        padding, and the row's tokens count from its first real one (only token-indexed buffers change)."""
        raise NotImplementedError

    def projection_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def step_weights(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_sizes(self) -> tuple:
        raise NotImplementedError

    @torch.no_grad()
    def reset_mimic(self) -> None:
        """Nothing to do by default: the model's normal initialisation stands."""


class RecurrentMixer(TokenMixer):
    """A constant-memory mixer: per row, one float32 state and the tails of its short convolutions (if any),
    cached as a ``RecurrentCache`` (``conv`` keyed by ``conv_names``) and, for fixed-shape decoding, as a
    "state" buffer and one "tail" buffer holding the convolutions' channels side by side in that order."""

    conv_names: ClassVar[tuple[str, ...]] = ()

    def state_shape(self) -> tuple[int, ...]:
        """Per-row shape of the state (e.g. [H, K, V])."""
        raise NotImplementedError

    def conv_layout(self) -> tuple[int, list[int]]:
        """(kernel width, channels of each convolution in ``conv_names``)."""
        raise NotImplementedError

    def new_cache(self, window: int | None) -> RecurrentCache:
        return RecurrentCache()

    def static_buffers(self, batch: int, window: int, device, dtype) -> dict[str, torch.Tensor]:
        buffers = {"state": torch.zeros(batch, *self.state_shape(), device=device)}
        if self.conv_names:
            width, channels = self.conv_layout()
            buffers["tail"] = torch.zeros(batch, width - 1, sum(channels), device=device, dtype=dtype)
        return buffers

    def load_static(self, buffers: dict[str, torch.Tensor], entry, shift: int = 0) -> None:
        if entry.state is None:  # nothing cached yet: the buffers' zeros are the empty stream
            return
        buffers["state"].copy_(entry.state)
        if self.conv_names:
            buffers["tail"].copy_(torch.cat([entry.conv[name] for name in self.conv_names], dim=-1))
