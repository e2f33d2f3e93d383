"""The name transformers gives a model's key/value cache, as a forward argument and an output field, for the
Qwen2.5-VL baselines the benchmarks decode with.

Newer transformers call it ``cache`` and warn on the old ``past_key_values``; 5.18, the floor of the project's
range, knows only ``past_key_values``. The forward's signature says which this install takes.
"""

from __future__ import annotations

import inspect

from transformers import Qwen2_5_VLForConditionalGeneration

CACHE = (
    "cache"
    if "cache" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
    else "past_key_values"
)


def with_cache(cache) -> dict:
    """The keyword argument that hands ``cache`` to a transformers model's forward."""
    return {CACHE: cache}


def cache_of(output):
    """The cache a transformers model's forward returned."""
    return getattr(output, CACHE)
