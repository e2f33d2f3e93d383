"""Optional GPU libraries (flash-linear-attention, flash-attn), probed once, in one place."""

from __future__ import annotations

import functools
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
def flash_attn_varlen():
    """flash-attn's varlen function, or None when flash-attn is not installed (it has no CPU build)."""
    if os.environ.get("IVL_DISABLE_FLASH_ATTN") == "1":
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func
