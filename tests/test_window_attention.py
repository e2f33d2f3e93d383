import pytest
import torch

from ivl.kernels import sliding_window_attention
from ivl.kernels.window_attention import attention_at_positions, sliding_window_attention_after_prefix
from references import dense_window_attention


def qkv(B=2, T=23, Hq=4, Hkv=2, D=8):
    return torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)


@pytest.mark.parametrize("window", [1, 5, 23, 100, None])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_matches_dense_band_mask(window, heads):
    q, k, v = qkv(Hq=heads[0], Hkv=heads[1])
    out = sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(out.double(), dense_window_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_window_one_returns_own_value():
    q, k, v = qkv(Hq=2, Hkv=2)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 1), v)


def test_scale():
    q, k, v = qkv()
    out = sliding_window_attention(q, k, v, 4, scale=0.3)
    torch.testing.assert_close(out.double(), dense_window_attention(q, k, v, 4, scale=0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [3, None])
def test_varlen_no_attention_across_sequences(window):
    lengths = [5, 1, 11, 6]
    cu = torch.tensor([0, 5, 6, 17, 23], dtype=torch.int32)
    q, k, v = qkv(B=1, T=sum(lengths))
    out = sliding_window_attention(q, k, v, window, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = dense_window_attention(q[:, a:b], k[:, a:b], v[:, a:b], window)
        torch.testing.assert_close(out[:, a:b].double(), ref, rtol=1e-5, atol=1e-5)


def test_keys_at_positions_in_any_order():
    """The ring-buffer path: keys shuffled but labelled with their token index give the band-mask result."""
    q, k, v = qkv(T=20)
    window = 6
    ref = dense_window_attention(q, k, v, window)[:, -4:]
    perm = torch.randperm(20)
    out = attention_at_positions(q[:, -4:], k[:, perm], v[:, perm], torch.arange(16, 20), perm, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [6, None])
def test_chunk_after_cached_prefix_equals_rows_of_the_whole(window):
    """Chunked prefill: the last T queries over (P cached + T new) keys are those rows of attention over all."""
    q, k, v = qkv(T=20)
    ref = dense_window_attention(q, k, v, window)[:, -7:]
    out = sliding_window_attention_after_prefix(q[:, -7:], k, v, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sliding_window_attention(torch.randn(2, 23, 3, 8), k, v, 4)
    with pytest.raises(ValueError, match="window must be"):
        sliding_window_attention(q, k, v, 0)
