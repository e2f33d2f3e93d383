"""The plain-PyTorch model: config, layers, hybrid LM, cache, vision tower, InfiniteVL and teacher conversion.

``mixers/`` holds the token mixers and their contract, ``decoding/`` the decode engine (fixed-shape steps,
continuous batching), ``training/`` what only training runs through the model (chunked head losses, cheap
recomputation).
"""

from ivl.model.cache import HybridCache
from ivl.model.config import HybridConfig, InfiniteVLConfig
from ivl.model.convert import ConversionReport, convert_qwen2_5_vl
from ivl.model.lm import HybridLM
from ivl.model.vlm import InfiniteVL, InfiniteVLOutput

__all__ = [
    "ConversionReport",
    "HybridCache",
    "HybridConfig",
    "HybridLM",
    "InfiniteVL",
    "InfiniteVLConfig",
    "InfiniteVLOutput",
    "convert_qwen2_5_vl",
]
