"""Matrix-vector products for batch-1 decoding, streaming the weights at close to copy bandwidth.

A batch-1 decode step multiplies one row by every weight matrix of the model, so its time is the time to read
the weights. cuBLAS's kernels for a single row read them well below the bandwidth of a device copy at our shapes
(docs/benchmarks.md has both), and that gap was most of what stood between the decode step and the weights'
roofline. A matrix-vector product needs
no tensor cores, only many independent, wide, coalesced loads in flight: each program here reads a few whole rows
of the weight in [rows, BLOCK_K] tiles, multiplies them by the matching slice of the row vector in float32, and
reduces once at the end. Tile shapes per matrix shape come from ``python -m ivl.bench gemv --sweep``.

``linear`` is ``F.linear`` everywhere else: on CPU, for more than one row, without Triton, with
``IVL_DISABLE_GEMV=1``. The kernel is a ``torch.library.triton_op``, so ``torch.compile`` graphs and CUDA graphs
see it as one kernel.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

ENABLED = importlib.util.find_spec("triton") is not None and os.environ.get("IVL_DISABLE_GEMV") != "1"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a single row of half-precision ``x`` on CUDA takes the Triton kernel."""
    if (
        ENABLED
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(-1) == 1
    ):
        return torch.ops.ivl.gemv(x.reshape(-1).contiguous(), weight, bias).view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


# The fastest tiles of `python -m ivl.bench gemv --sweep` (1x H100 80GB HBM3, 2026-11-25) for each weight shape of
# an infinitevl-4b decode step: (BLOCK_N, BLOCK_K, num_warps, num_stages).
TUNED = {
    (12320, 2048): (2, 2048, 2, 3),  # Gated DeltaNet q/k/v/g/a/b
    (2048, 4096): (1, 2048, 8, 3),  # Gated DeltaNet output
    (2560, 2048): (2, 1024, 4, 1),  # attention q/k/v
    (2048, 2048): (2, 1024, 4, 1),  # attention output
    (22016, 2048): (4, 2048, 4, 1),  # MLP gate/up
    (2048, 11008): (1, 2048, 8, 1),  # MLP down
    (151936, 2048): (2, 1024, 4, 1),  # LM head
}


def config_for(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a [rows, cols] weight."""
    if (rows, cols) in TUNED:
        return TUNED[rows, cols]
    # Other shapes follow the pattern of the tuned ones: one or two rows per program (thousands of programs keep
    # every SM's loads in flight), long tiles, and more warps for long rows.
    if cols >= 4096:
        return 1, 2048, 8, 1
    return 2, min(1024, 1 << (cols - 1).bit_length()), 4, 1


if ENABLED:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        out_ptr,
        N,
        K,
        stride_w,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # The weights are read once per step: evict_first keeps them from pushing x out of L2.
            if EVEN_K:  # unmasked along K, so the loads stay 16 bytes wide
                x = tl.load(x_ptr + k0 + cols)
                w = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                col_ok = k0 + cols < K
                x = tl.load(x_ptr + k0 + cols, mask=col_ok, other=0.0)
                w = tl.load(w_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    def launch(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        block_n: int,
        block_k: int,
        num_warps: int,
        num_stages: int = 3,
        kernel=_gemv_kernel,
    ) -> torch.Tensor:
        N, K = weight.shape
        # An absent bias still needs a pointer; HAS_BIAS=False never reads it.
        kernel[(triton.cdiv(N, block_n),)](
            x,
            weight,
            weight if bias is None else bias,
            out,
            N,
            K,
            weight.stride(0),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            EVEN_K=K % block_k == 0,
            HAS_BIAS=bias is not None,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        return out

    @triton_op("ivl::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """weight [N, K] @ x [K] (+ bias [N]) -> [N], accumulated in float32."""
        if x.shape[0] != weight.shape[1]:
            raise ValueError(f"gemv: input of {x.shape[0]} values for a weight of shape {list(weight.shape)}")
        out = torch.empty(weight.shape[0], device=x.device, dtype=x.dtype)
        return launch(x, weight, bias, out, *config_for(*weight.shape), kernel=wrap_triton(_gemv_kernel))
