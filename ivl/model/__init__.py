"""The plain-PyTorch model: config, layers, hybrid LM, cache, vision tower, InfiniteVL and teacher conversion."""

from ivl.model.cache import HybridCache
from ivl.model.config import HybridConfig, InfiniteVLConfig
from ivl.model.lm import HybridLM
from ivl.model.vlm import InfiniteVL, InfiniteVLOutput
from ivl.model.convert import ConversionReport, convert_qwen2_5_vl

__all__ = ["ConversionReport", "HybridCache", "HybridConfig", "HybridLM", "InfiniteVL", "InfiniteVLConfig",
           "InfiniteVLOutput", "convert_qwen2_5_vl"]
