"""Optional GPU libraries (flash-linear-attention, flash-attn), probed once, in one place."""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def fla_gated_delta():
    """(chunk, fused_recurrent) gated delta rule kernels from fla, or None when fla is not installed.

    Set IVL_DISABLE_FLA=1 to force the PyTorch path (used to compare the two on a GPU).
    """
    if os.environ.get("IVL_DISABLE_FLA") == "1":
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


@functools.cache
def fla_gated_backward_is_broken() -> bool:
    """True where fla refuses its gated chunk backward: Triton 3.4 up to 3.7.1 miscompiles it on Hopper
    (fla issue #640) and fla raises instead, unless tilelang provides another backend. The GPU machines ship
    Triton 3.6, so training there takes fla's forward with a PyTorch backward (see gated_delta.py).
    """
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return False
    return importlib.util.find_spec("tilelang") is None


@functools.cache
def flash_attn_varlen():
    """flash-attn's varlen function, or None when flash-attn is not installed (it has no CPU build)."""
    if os.environ.get("IVL_DISABLE_FLASH_ATTN") == "1":
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func
