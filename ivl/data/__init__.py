"""Data: the Qwen2.5-VL processor and chat template (and, later, corpora, packing and DataModules)."""

from ivl.data.processing import Processor

__all__ = ["Processor"]
