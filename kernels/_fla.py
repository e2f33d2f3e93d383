"""Optional GPU libraries (flash-linear-attention, flash-attn), probed once, in one place."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys


def _optional(disable_env: str, module: str, *names: str):
    """The named attributes of an optional module, or None when it is missing or ``disable_env`` is set to 1."""
    if os.environ.get(disable_env) == "1":
        return None
    try:
        imported = importlib.import_module(module)
    except ImportError:
        if module.startswith("fla."):
            _say_fla_is_missing()
        return None
    return tuple(getattr(imported, name) for name in names)


@functools.cache
def _say_fla_is_missing() -> None:
    """Once per process, at the first GPU call that wanted fla (every probe here runs only for CUDA tensors):
    without it the linear mixers run their PyTorch path, several times slower, and nothing else would say so."""
    print(
        "ivl: flash-linear-attention is not installed: Gated DeltaNet and the other linear mixers run their "
        'PyTorch path on this GPU, several times slower; install the fast one with pip install -e ".[gpu]" '
        "(fla-core, flash-linear-attention)",
        file=sys.stderr,
        flush=True,
    )


@functools.cache
def fla_gated_delta():
    """(chunk, fused_recurrent) gated delta rule kernels from fla, or None when fla is not installed.

    Set IVL_DISABLE_FLA=1 to force the PyTorch path (used to compare the two on a GPU).
    """
    return _optional(
        "IVL_DISABLE_FLA", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"
    )


@functools.cache
def fla_linear_kernels():
    """(chunk_gla, chunk_simple_gla): fla's gated linear attention with a per-channel and a per-head (or no)
    decay, or None without fla."""
    gla = _optional("IVL_DISABLE_FLA", "fla.ops.gla", "chunk_gla")
    simple = _optional("IVL_DISABLE_FLA", "fla.ops.simple_gla", "chunk_simple_gla")
    return (gla[0], simple[0]) if gla and simple else None


@functools.cache
def fla_causal_conv1d():
    """fla's Triton causal depthwise convolution ([B, T, D] layout, fused SiLU, varlen), or None without fla."""
    found = _optional("IVL_DISABLE_FLA", "fla.modules.causal_conv1d", "causal_conv1d")
    return found[0] if found else None


@functools.cache
def fla_gated_backward_is_refused(tilelang_can_take_it: bool = True) -> bool:
    """True where fla 0.6 refuses its gated chunk backward: Hopper with Triton 3.4 up to 3.7.1, unless fla runs that
    kernel (``chunk_bwd_dqkwg``) in TileLang instead.

    fla raises in ``chunk_bwd_dqkwg`` there (fla issue #640, https://github.com/fla-org/flash-linear-attention/
    issues/640) for every block width, but the bisection in #640 pins the miscompile to the BK = 64 tile alone;
    see ``fla_backward_is_miscompiled`` for the narrower test. fla's dispatch hands the kernel to TileLang where its
    backend is usable (tilelang installed, nvcc found, FLA_TILELANG not 0; fla's own backend answers) and the call's
    states are in the inputs' dtype: Gated DeltaNet's are, so nothing is refused there; simple GLA's backward keeps
    them in float32, TileLang never takes it, and its callers pass ``tilelang_can_take_it=False``. The GPU machines
    ship Triton 3.6.
    """
    try:
        from fla.ops.common.backends.tilelang import CommonTileLangBackend
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return False
    return not (tilelang_can_take_it and CommonTileLangBackend.can_use())


def fla_backward_is_miscompiled(head_k_dim: int, tilelang_can_take_it: bool = True) -> bool:
    """True where fla's gated backward would run the miscompiled tile: refused (above) and a key width that makes
    ``chunk_bwd_dqkwg`` pick BK = min(max(next_pow2(K), 16), 128) <= 64 on Hopper, i.e. K <= 64. At K = 128
    (InfiniteVL's) BK is 128, which #640 found correct and our GPU tests check against a float32 reference.
    """
    return fla_gated_backward_is_refused(tilelang_can_take_it) and head_k_dim <= 64


@functools.cache
def fla_chunk_function():
    """fla's autograd Function of the chunked gated delta rule (``ChunkGatedDeltaRuleFunction``), or None."""
    found = _optional("IVL_DISABLE_FLA", "fla.ops.gated_delta_rule.chunk", "ChunkGatedDeltaRuleFunction")
    return found[0] if found else None


@functools.cache
def fla_simple_gla_function():
    """fla's autograd Function of chunked gated linear attention with a per-head decay
    (``ChunkSimpleGLAFunction``), or None."""
    found = _optional("IVL_DISABLE_FLA", "fla.ops.simple_gla.chunk", "ChunkSimpleGLAFunction")
    return found[0] if found else None


@contextlib.contextmanager
def fla_refusal_lifted():
    """While open, fla's #640 check in ``chunk_bwd_dqkwg`` reads Triton as fixed (>= 3.7.1).

    Opened only by the backward of ``gated_delta_rule`` (or of ``gated_linear_attention`` with a per-head decay),
    around fla's own backward of one call whose key width is outside the miscompiled tile
    (``fla_backward_is_miscompiled`` is False), and closed when that backward returns: no other code, in this
    process or later, sees the flag changed. Autograd runs one device's backward nodes one at a time, so nothing
    else runs fla's check while it is open.
    """
    module = importlib.import_module("fla.ops.common.chunk_o")
    saved = module.TRITON_ABOVE_3_7_1
    module.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        module.TRITON_ABOVE_3_7_1 = saved


@functools.cache
def flash_attn_varlen():
    """flash-attn's varlen function, or None when flash-attn is not installed (it has no CPU build)."""
    found = _optional("IVL_DISABLE_FLASH_ATTN", "flash_attn", "flash_attn_varlen_func")
    return found[0] if found else None
