"""ivl's short-convolution backward kernel against autograd through the tap loop in float64. On a GPU it runs
inside the training path (tests/test_gpu_kernels.py); here it runs in Triton's interpreter, where Triton is
installed (the GPU machines; CI's CPU torch comes without it)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from ivl.model.mixers.short_convolution import _causal_conv_silu, sequence_positions

# (batch, tokens, channels, taps, packed bounds, rows per program): blocks that end inside a sequence, a sequence
# of one token, fewer tokens than rows, narrower weights
CASES = [
    (1, 100, 70, 4, None, 16),
    (2, 130, 64, 4, None, 32),
    (1, 150, 40, 4, [0, 5, 6, 70, 150], 16),
    (1, 90, 33, 3, [0, 2, 50, 90], 8),
    (1, 90, 33, 2, [0, 1, 50, 90], 7),
    (1, 5, 20, 4, None, 8),
]


def check_against_tap_loop(B, T, C, W, cu, rows):
    from ivl.kernels.conv_backward import conv_silu_backward

    torch.manual_seed(0)
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, W, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(T) if cu is None else sequence_positions(torch.tensor(cu), T, x.device)
    y, _ = _causal_conv_silu.eager(x, None, w, None if cu is None else pos)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dw = conv_silu_backward(
        x.detach().float(), w.detach().float(), dy.float(), pos.to(torch.int32), rows=rows, block=32
    )
    torch.testing.assert_close(dx.double(), x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), w.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on CPU)")
def test_backward_kernel_in_triton_interpreter_matches_autograd_through_the_tap_loop():
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_conv_backward as t\n"
        "for case in t.CASES: t.check_against_tap_loop(*case)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
