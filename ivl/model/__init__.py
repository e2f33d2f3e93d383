"""The InfiniteVL-style model in plain PyTorch: config, layers, hybrid LM, cache."""

from ivl.model.cache import HybridCache
from ivl.model.config import HybridConfig
from ivl.model.lm import HybridLM

__all__ = ["HybridCache", "HybridConfig", "HybridLM"]
