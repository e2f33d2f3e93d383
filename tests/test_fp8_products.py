"""The FP8 products of ``ivl.bench fp8 --accuracy``: e4m3 with row-wise scales, the real ``torch._scaled_mm`` on the
CPU, and with block-wise scales, each held to a product of operands rounded block by block in a naive loop."""

import pytest
import torch
import torch.nn.functional as F

from ivl.bench.fp8 import E4M3_MAX, fp8_products, quantize_rows, round_blocks


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


def rounded_block_by_block(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            block = x[i : i + rows, j : j + cols].float()  # scales are float32, as the FP8 kernels take them
            scale = block.abs().max() / E4M3_MAX
            out[i : i + rows, j : j + cols] = (block / scale).to(torch.float8_e4m3fn).double() * scale.double()
    return out


@pytest.mark.parametrize("rows, cols", [(1, 128), (128, 128)])
def test_each_block_has_its_own_scale_and_edge_blocks_are_cut_short(rows, cols):
    torch.manual_seed(0)
    x = torch.randn(130, 200) * torch.logspace(-3, 3, 130)[:, None] * torch.logspace(0, 2, 200)
    torch.testing.assert_close(round_blocks(x, rows, cols).double(), rounded_block_by_block(x, rows, cols))


@pytest.mark.parametrize("scales, x_block, w_block", [("block", (1, 128), (128, 128)), ("tile", (1, 128), (1, 128))])
def test_block_scaled_linear_is_the_product_of_the_rounded_operands(scales, x_block, w_block):
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 256, dtype=torch.bfloat16), torch.randn(144, 256, dtype=torch.bfloat16)
    (xr, xc), (wr, wc) = x_block, w_block
    expected = rounded_block_by_block(x.reshape(-1, 256), xr, xc) @ rounded_block_by_block(w, wr, wc).T
    with fp8_products(scales):
        got = torch.nn.functional.linear(x, w)
    assert got.shape == (2, 7, 144) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected.view(2, 7, 144), rtol=2e-2, atol=2e-2)
    exact = x.double() @ w.double().T
    assert (got.double() - exact).norm() / exact.norm() > 1e-2  # e4m3's rounding shows, bf16's alone would not
