"""Optional GPU libraries (flash-linear-attention, flash-attn), probed once, in one place."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os


def _optional(disable_env: str, module: str, *names: str):
    """The named attributes of an optional module, or None when it is missing or ``disable_env`` is set to 1."""
    if os.environ.get(disable_env) == "1":
        return None
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return None
    return tuple(getattr(imported, name) for name in names)


@functools.cache
def fla_gated_delta():
    """(chunk, fused_recurrent) gated delta rule kernels from fla, or None when fla is not installed.

    Set IVL_DISABLE_FLA=1 to force the PyTorch path (used to compare the two on a GPU).
    """
    return _optional("IVL_DISABLE_FLA", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                     "fused_recurrent_gated_delta_rule")


@functools.cache
def fla_causal_conv1d():
    """fla's Triton causal depthwise convolution ([B, T, D] layout, fused SiLU, varlen), or None without fla."""
    found = _optional("IVL_DISABLE_FLA", "fla.modules.causal_conv1d", "causal_conv1d")
    return found[0] if found else None


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
    found = _optional("IVL_DISABLE_FLASH_ATTN", "flash_attn", "flash_attn_varlen_func")
    return found[0] if found else None
