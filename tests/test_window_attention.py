import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from references import dense_window_attention

from ivl.kernels.window_attention import (
    attention_at_positions,
    padded_window_attention,
    sliding_window_attention,
    sliding_window_attention_after_prefix,
)


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


@pytest.mark.parametrize("window", [3, 8, None])
def test_a_padded_batch_as_packed_sequences_equals_each_row_alone(window):
    """Left- and right-padded rows (padding runs longer than the window included: queries whose whole window is
    padding), against each row's real tokens alone through the dense band: outputs, zeros at padding, and
    gradients, all finite."""
    B, T = 4, 20
    q, k, v = (t.requires_grad_() for t in qkv(B=B, T=T))
    lengths, left = [20, 7, 12, 1], [True, True, False, True]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (n, is_left) in enumerate(zip(lengths, left)):
        if is_left:
            mask[b, T - n :] = 1
        else:
            mask[b, :n] = 1
    assert mask.sum(1).tolist() == lengths
    out = padded_window_attention(q, k, v, mask, window)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]

    for b in range(B):
        real = mask[b].bool()
        alone = [t.detach()[b : b + 1, real].double().requires_grad_() for t in (q, k, v)]
        ref = dense_window_attention(*alone, window)
        (ref * w[b : b + 1, real].double()).sum().backward()
        torch.testing.assert_close(out[b : b + 1, real].double(), ref, rtol=1e-5, atol=1e-5)
        assert not out[b, ~real].any()
        for g, a in zip(grads, alone):
            torch.testing.assert_close(g[b : b + 1, real].double(), a.grad, rtol=1e-5, atol=1e-5)
            assert not g[b, ~real].any()
    assert all(torch.isfinite(g).all() for g in grads)


def test_bad_input_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sliding_window_attention(torch.randn(2, 23, 3, 8), k, v, 4)
    with pytest.raises(ValueError, match="window must be"):
        sliding_window_attention(q, k, v, 0)


@pytest.mark.parametrize("cu", [None, [0, 90, 200, 300]])
def test_flex_paths_pad_to_whole_blocks_exactly(monkeypatch, cu):
    """The CUDA FlexAttention paths pad lengths to whole blocks; run them on the CPU with eager FlexAttention
    and hold them to the dense band (the padded keys must stay invisible, the padded rows must be dropped)."""
    from torch.nn.attention import flex_attention as flex

    from ivl.kernels import window_attention as wa

    build = flex.create_block_mask  # uncompiled here: the CPU needs no C++ toolchain for it
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, _compile, **kw: build(*a, **kw))
    monkeypatch.setattr(wa, "_compiled_flex_attention", lambda: flex.flex_attention)
    T = 100 if cu is None else 300
    cu_seqlens = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    q, k, v = torch.randn(1, T, 4, 32), torch.randn(1, T, 2, 32), torch.randn(1, T, 2, 32)
    out = wa._flex_attention(q, k, v, 32, cu_seqlens, 32**-0.5)
    doc_ids = torch.bucketize(torch.arange(T), torch.tensor(cu[1:]), right=True) if cu is not None else None
    torch.testing.assert_close(out, dense_window_attention(q, k, v, 32, doc_ids).float())
    P = 150  # a chunk of T queries after P cached keys
    kp, vp = torch.randn(1, P + T, 2, 32), torch.randn(1, P + T, 2, 32)
    positions = torch.arange(P + T)
    torch.testing.assert_close(
        wa._flex_attention_after_prefix(q, kp, vp, P, 64, 32**-0.5),
        attention_at_positions(q, kp, vp, positions[P:], positions, 64),
    )


def _naive_ring_decode(q, keys, values, visible):
    """One query per (row, head), a softmax over the visible keys of its key/value head, in float64."""
    B, _, Hq, D = q.shape
    Hkv = keys.shape[1]
    out = torch.zeros(B, 1, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            seen = visible[b].nonzero().squeeze(1)
            weights = torch.softmax((keys[b, kv, seen].double() @ q[b, 0, h].double()) * D**-0.5, 0)
            out[b, 0, h] = weights @ values[b, kv, seen].double()
    return out


def _ring(B=3, Hq=8, Hkv=2, S=256, D=32, device="cpu", dtype=torch.float32):
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
    keys, values = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
    visible = torch.rand(B, S, device=device) < 0.7
    visible[:, 5] = True
    return q, keys, values, visible


def test_ring_decode_attention_matches_a_naive_loop():
    from ivl.kernels.window_attention import ring_decode_attention

    q, keys, values, visible = _ring(S=37)
    expected = _naive_ring_decode(q, keys, values, visible)
    torch.testing.assert_close(ring_decode_attention(q, keys, values, visible), expected.float())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["matmul", "split"])
def test_compiled_ring_decode_on_cuda_matches_a_naive_loop(monkeypatch, kernel):
    from ivl.kernels import window_attention as wa

    monkeypatch.setattr(wa, "DECODE_KERNEL", kernel)
    q, keys, values, visible = _ring(B=3, Hq=16, Hkv=2, S=1000, D=128, device="cuda", dtype=torch.bfloat16)
    visible[1, 300:] = False  # whole slices of the keys that one row does not see
    step = torch.compile(wa.ring_decode_attention, fullgraph=True, dynamic=False)
    expected = _naive_ring_decode(q.cpu(), keys.cpu(), values.cpu(), visible.cpu())
    torch.testing.assert_close(step(q, keys, values, visible).double().cpu(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton, whose interpreter runs it")
def test_split_key_kernel_in_tritons_interpreter_matches_a_naive_loop():
    """The split-key decode kernel's own code, run by Triton's interpreter on the CPU (it must be set before the
    kernel is defined, hence a fresh process): slices of keys, a last slice cut short, a row that sees no key of
    most slices, grouped and ungrouped heads."""
    script = textwrap.dedent(
        """
        import torch
        from test_window_attention import _naive_ring_decode, _ring
        from ivl.kernels import ring_decode
        torch.manual_seed(0)
        for B, Hq, Hkv, S, D in [(3, 16, 2, 1000, 32), (1, 4, 2, 16, 16), (2, 8, 8, 300, 16)]:
            q, keys, values, visible = _ring(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D)
            visible[1:2, 200:] = False  # a row that sees no key of most slices
            visible[:1, : S // 3] = False  # a slice that starts with tiles it does not see, then sees keys
            visible[:, 150 % S] = True  # every row sees a key
            out = ring_decode.split_key_attention(q, keys, values, visible)
            torch.testing.assert_close(out, _naive_ring_decode(q, keys, values, visible).float())
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
