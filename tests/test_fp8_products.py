"""The FP8 products of ``ivl.bench fp8 --accuracy``: e4m3 with row-wise scales, the real ``torch._scaled_mm`` on the
CPU, held to a product of the rounded operands computed in float64."""

import pytest
import torch
import torch.nn.functional as F

from ivl.bench.fp8 import E4M3_MAX, fp8_products, quantize_rows


def test_rows_are_scaled_to_the_e4m3_range_and_rounded_to_its_three_mantissa_bits():
    x = torch.randn(32, 64) * torch.logspace(-3, 3, 32)[:, None]  # rows of very different magnitudes
    x8, scale = quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (32, 1)
    assert torch.allclose(x8.float().abs().amax(-1), torch.full((32,), E4M3_MAX))  # each row's largest value
    back = x8.float() * scale
    normal = back.abs() >= 2**-6 * scale  # e4m3's normal range: relative rounding error at most 2^-4
    assert ((back - x)[normal].abs() <= 2**-4 * x[normal].abs()).all()


def test_linear_inside_runs_scaled_mm_on_the_rounded_operands_and_is_restored_after():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64, dtype=torch.bfloat16), torch.randn(48, 64, dtype=torch.bfloat16)
    b = torch.randn(48, dtype=torch.bfloat16)
    x8, xs = quantize_rows(x.reshape(-1, 64))
    w8, ws = quantize_rows(w)
    expected = ((x8.double() * xs) @ (w8.double() * ws).T).view(3, 5, 48) + b.double()
    original = F.linear
    with fp8_products():
        got = torch.nn.functional.linear(x, w, b)
        odd = torch.nn.functional.linear(x[..., :60], w[:40, :60])  # sides not multiples of 16: left in bf16
    assert torch.nn.functional.linear is original
    assert got.shape == (3, 5, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(odd, original(x[..., :60], w[:40, :60]))
    with pytest.raises(RuntimeError), fp8_products():
        raise RuntimeError("an error inside")
    assert torch.nn.functional.linear is original
