"""The arithmetic precision of the PyTorch paths: at least float32, and float64 where the inputs are float64."""

from __future__ import annotations

import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or unchanged if it is float64. The norms, gates and recurrences compute in float32 whatever
    the model's dtype, but a float64 copy of a model (the tests' exact reference for float32 paths) must stay
    float64 all through: float32 steps inside it would give the reference float32's rounding."""
    return t if t.dtype == torch.float64 else t.float()
