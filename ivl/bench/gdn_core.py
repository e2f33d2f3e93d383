"""The gated delta rule alone at InfiniteVL's shapes, by implementation: the rows of ``ivl.bench layers --mixers
gdn-core``.

Two shapes per implementation, 16 heads, K 128, V 256, bf16, with an initial state and the final state: one packed
row of four sequences (1/8, 3/8, 1/4 and 1/4 of T), as training calls it, and one sequence of T tokens, as a prefill
chunk calls it (``cu_seqlens`` None). Implementations:

- fla: ivl's ``gated_delta_rule`` with fla's own layout (V 256 per head).
- value heads of 128: the same call with each head as two value heads of 128 (``ivl.kernels.value_heads``), the
  K = V = 128 shape at which fla hands the call to FlashQLA when flash-qla is installed; the row names the backend
  fla's dispatch picked.
- FlashQLA without its intra-card split: flash_qla called directly with ``auto_cp=False`` (fla's dispatch always
  passes True, which splits one long sequence across the card), when flash-qla is installed.
- FlashInfer: ``flashinfer.gdn_prefill.chunk_gated_delta_rule`` on the same grouped layout (forward only; its gate
  is exp(g) and its state [N, H, V, K]), when flashinfer is installed.

Each row also gives its largest relative error against ivl's float32 PyTorch path at the first length.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import logging

import torch
import torch.nn.functional as F

import ivl.kernels.gated_delta as gated_delta
from ivl.kernels.value_heads import merge_value_heads, split_value_heads
from ivl.model import HybridConfig

SHAPES = ("4 packed sequences", "1 sequence")


def inputs(config: HybridConfig, T: int, dtype: torch.dtype, shape: str = SHAPES[0]):
    H, K, V = config.linear_num_heads, config.linear_head_k_dim, config.linear_head_v_dim
    q = F.normalize(torch.randn(1, T, H, K, device="cuda"), dim=-1).to(dtype)
    k = F.normalize(torch.randn(1, T, H, K, device="cuda"), dim=-1).to(dtype)
    v = torch.randn(1, T, H, V, device="cuda", dtype=dtype)
    g = F.logsigmoid(torch.randn(1, T, H, device="cuda") + 4)
    beta = torch.rand(1, T, H, device="cuda", dtype=dtype)
    cu = torch.tensor([0, T // 8, T // 2, 3 * T // 4, T], dtype=torch.int32, device="cuda")
    if shape == SHAPES[1]:
        cu = None
    h0 = torch.randn(1 if cu is None else 4, H, K, V, device="cuda") / 8
    return [t.requires_grad_() for t in (q, k, v, g, beta, h0)], cu


def head_width(text: str) -> int:
    """--value-head-width's values: a positive width (one that does not divide a head's V leaves it as built)."""
    width = int(text)
    if width <= 0:
        raise argparse.ArgumentTypeError(f"a value head width is a positive number of channels, not {width}")
    return width


@contextlib.contextmanager
def value_head_width(width: int | None):
    saved = gated_delta.VALUE_HEAD_WIDTH
    gated_delta.VALUE_HEAD_WIDTH = width
    try:
        yield
    finally:
        gated_delta.VALUE_HEAD_WIDTH = saved


def ivl_rule(width: int | None):
    def call(q, k, v, g, beta, h0, cu):
        with value_head_width(width):
            return gated_delta.gated_delta_rule(
                q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu
            )

    return call


def flash_qla_whole_sequences(q, k, v, g, beta, h0, cu):
    """FlashQLA called directly with its intra-card split of long sequences off (fla's dispatch passes
    ``auto_cp=True``)."""
    import flash_qla

    heads, width = q.shape[2], q.shape[-1]
    v, g, beta, h0 = split_value_heads(v, g, beta, h0, width)
    o, state = flash_qla.chunk_gated_delta_rule(
        q, k, v, g, beta, scale=width**-0.5, initial_state=h0, output_final_state=True, cu_seqlens=cu, auto_cp=False
    )
    return merge_value_heads(o, state.float(), heads)


def flashinfer_rule(q, k, v, g, beta, h0, cu):
    from flashinfer.gdn_prefill import chunk_gated_delta_rule

    heads, width = q.shape[2], q.shape[-1]
    if cu is None:
        cu = torch.arange(2, device=q.device) * q.shape[1]  # [0, T], made on the device: no copy in the timing
    v, g, beta, h0 = split_value_heads(v, g, beta, h0, width)
    o, state = chunk_gated_delta_rule(
        q[0].contiguous(),
        k[0].contiguous(),
        v[0].contiguous(),
        g=g[0].float().exp().contiguous(),
        beta=beta[0].float().contiguous(),
        scale=width**-0.5,
        initial_state=h0.float().transpose(-1, -2).contiguous(),
        output_final_state=True,
        cu_seqlens=cu.long(),
    )
    return merge_value_heads(o[None], state.transpose(-1, -2), heads)


def reference(q, k, v, g, beta, h0, cu):
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if cu is None:
        return gated_delta._chunked(q, k, v, g, beta, q.shape[-1] ** -0.5, h0)
    return gated_delta._varlen(q, k, v, g, beta, q.shape[-1] ** -0.5, h0, True, cu)


class FlaBackendLog(logging.Handler):
    """The backend fla's dispatch reports for the gated delta rule (its INFO line), or None for its Triton kernels."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.backend = None

    def emit(self, record):
        message = record.getMessage()
        if "gated_delta_rule" in message and "->" in message and "rejected" not in message:
            self.backend = message.rsplit("->", 1)[1].strip()


def rows(config: HybridConfig) -> dict:
    """label -> (call, differentiable)."""
    found = {f"gated delta rule, fla (V {config.linear_head_v_dim} per head)": (ivl_rule(None), True)}
    found["gated delta rule, value heads of 128"] = (ivl_rule(128), True)
    # flash_qla refuses to import on GPUs other than SM90, SM100/103 and SM120/121.
    if importlib.util.find_spec("flash_qla") is not None and torch.cuda.get_device_capability()[0] in (9, 10, 12):
        found["gated delta rule, FlashQLA without its intra-card split"] = (flash_qla_whole_sequences, True)
    if importlib.util.find_spec("flashinfer") is not None:
        found["gated delta rule, FlashInfer (value heads of 128; forward only)"] = (flashinfer_rule, False)
    return found


def relative_error(call, config: HybridConfig, T: int, dtype: torch.dtype, shape: str) -> float:
    (q, k, v, g, beta, h0), cu = inputs(config, T, dtype, shape)
    with torch.no_grad():
        o, s = call(q, k, v, g, beta, h0, cu)
        o_ref, s_ref = reference(q, k, v, g, beta, h0, cu)
    return max(((a.float() - b).norm() / b.norm()).item() for a, b in ((o, o_ref), (s, s_ref)))


def run(config: HybridConfig, lengths: list[int], dtype: torch.dtype, repeats: int, time_ms) -> None:
    """Print one table row per implementation (cells: fwd / fwd+bwd ms)."""
    log = FlaBackendLog()
    fla_logger = logging.getLogger("fla.backends")
    fla_logger.addHandler(log)
    fla_logger.setLevel(logging.INFO)
    for (label, (call, differentiable)), shape in itertools.product(rows(config).items(), SHAPES):
        log.backend = None
        error = relative_error(call, config, lengths[0], dtype, shape)
        cells = []
        for T in lengths:
            (q, k, v, g, beta, h0), cu = inputs(config, T, dtype, shape)
            w = torch.randn(1, T, q.shape[2], v.shape[-1], device="cuda", dtype=dtype)

            def forward():
                with torch.no_grad():
                    call(q, k, v, g, beta, h0, cu)

            def forward_backward():
                o, s = call(q, k, v, g, beta, h0, cu)
                torch.autograd.backward((o, s), (w, torch.ones_like(s)))

            try:
                fwd = time_ms(forward, repeats)
                both = f"{time_ms(forward_backward, repeats):.2f}" if differentiable else "-"
                cells.append(f"{fwd:.2f} / {both}")
            except torch.OutOfMemoryError:
                cells.append("OOM")
            torch.cuda.empty_cache()
        backend = f"; fla picked {log.backend}" if log.backend else ""
        note = f" (rel. error {error:.1e} at {lengths[0] // 1024}K{backend})"
        print(f"| {label}, {shape}{note} | " + " | ".join(cells) + " |", flush=True)
    fla_logger.removeHandler(log)
