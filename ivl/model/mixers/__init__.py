"""The token mixers: which exist (the registry), the contract they implement (``base``), one file each.

A layer type names a mixer (``HybridConfig.layer_types``). Everything else calls a mixer through the methods of
``TokenMixer`` and never tests its class, so adding a mixer is one file that implements them and one line in
``MIXERS``.

The registry maps names to import paths, resolved on first use: ``HybridConfig`` validates names against it
without importing the layers (which import the config).
"""

from __future__ import annotations

import importlib

from ivl.model.mixers.base import DecodeMatrix, RecurrentMixer, TokenMixer

MIXERS = {
    "attention": "ivl.model.mixers.attention:SlidingWindowAttention",
    "gated_deltanet": "ivl.model.mixers.gated_deltanet:GatedDeltaNet",
    "mamba2": "ivl.model.mixers.mamba2:Mamba2",
    "gla": "ivl.model.mixers.gla:GatedLinearAttention",
    "linear_attention": "ivl.model.mixers.linear_attention:LinearAttention",
}
LINEAR_MIXERS = tuple(name for name in MIXERS if name != "attention")
"""The constant-memory mixers: the ones ``hybrid_ratio`` places between the attention layers."""
ALIASES = {"gdn": "gated_deltanet"}

__all__ = [
    "ALIASES",
    "LINEAR_MIXERS",
    "MIXERS",
    "DecodeMatrix",
    "RecurrentMixer",
    "TokenMixer",
    "canonical_name",
    "mixer_class",
]


def canonical_name(name: str) -> str:
    """A registered mixer name (aliases such as "gdn" resolved), or a ValueError that lists the choices."""
    name = ALIASES.get(name, name)
    if name not in MIXERS:
        raise ValueError(f"{name!r} is not a known mixer; choose from {sorted(MIXERS)} (or {sorted(ALIASES)})")
    return name


def mixer_class(name: str) -> type[TokenMixer]:
    module, attribute = MIXERS[canonical_name(name)].split(":")
    return getattr(importlib.import_module(module), attribute)
