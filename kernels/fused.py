"""Elementwise chains (norms, gates, activations, RoPE, short convolutions) fused into Triton kernels on CUDA.

Eagerly, each PyTorch op of such a chain is one kernel that reads and writes the whole tensor: a float32 RMSNorm
alone is six passes over memory. That costs bandwidth in prefill (tens of passes over [T, 4096] tensors per
layer) and launches in decoding (about 25 kernels per layer per token). ``torch.compile`` fuses each chain into
one or two kernels; there is no library kernel for most of these chains (fla has some, with its own conventions),
and compiling our own functions keeps one definition of the math for CPU and GPU.

Functions decorated with ``@fused`` run as written on CPU tensors, inside an outer ``torch.compile``, and when
``IVL_COMPILE=0``; on CUDA tensors they run compiled (dynamic shapes, so prefill chunks and decode steps of any
length share one compilation).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch


def compile_enabled() -> bool:
    return os.environ.get("IVL_COMPILE", "1") != "0"


def fused(fn: Callable | None = None, *, dynamic: bool = True) -> Callable:
    """``@fused`` (one compilation for all shapes) or ``@fused(dynamic=False)`` (one per shape: for code that
    only ever sees a few shapes, such as a decode step, where shape-specialised kernels are faster)."""
    if fn is None:
        return functools.partial(fused, dynamic=dynamic)
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if not args[0].is_cuda or not compile_enabled() or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            # Each function is compiled again per dtype, per model width (sizes passed as Python ints) and, with
            # dynamic=False, per shape; a process that runs several models (the GPU tests, the benchmarks) needs
            # more than Dynamo's default of 8 variants per function.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = torch.compile(fn, dynamic=dynamic, fullgraph=True)
        return compiled(*args, **kwargs)

    run.eager = fn
    return run
