"""Gated linear attention (GLA, Mamba2, linear attention's recurrence) against a per-token loop in float64."""

import pytest
import torch

from ivl.kernels.gated_linear import gated_linear_attention, gated_linear_step


def naive(q, k, v, g, scale, state=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t), one token at a time."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if state is None else state.double().clone()
    out = []
    for t in range(T):
        if g is not None:
            decay = g[:, t].double().exp()
            S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        S = S + k[:, t].double()[..., None] * v[:, t].double()[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].double() * scale, S))
    return torch.stack(out, 1), S


def inputs(decay, B=2, T=75, H=3, K=8, V=5, strong=False):
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K) / K**0.5
    v = torch.randn(B, T, H, V)
    shape = {"channel": (B, T, H, K), "head": (B, T, H)}.get(decay)
    g = None if shape is None else -torch.rand(shape) * (8.0 if strong else 0.3)
    return q, k, v, g


@pytest.mark.parametrize("decay", ["channel", "head", "none"])
def test_chunked_equals_the_token_loop_from_a_state(decay):
    q, k, v, g = inputs(decay)
    s0 = torch.randn(2, 3, 8, 5)
    o, s = gated_linear_attention(q, k, v, g, scale=0.7, initial_state=s0, output_final_state=True)
    ref_o, ref_s = naive(q, k, v, g, 0.7, s0)
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


def test_strong_decay_over_long_chunks_stays_finite():
    """Cumulative log-decays of hundreds inside a chunk: exp(G_t) exp(-G_j) would overflow float32."""
    q, k, v, g = inputs("channel", T=64, strong=True)
    o, _ = gated_linear_attention(q, k, v, g)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), naive(q, k, v, g, 8**-0.5)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay", ["channel", "head", "none"])
def test_packed_sequences_equal_separate_calls(decay):
    q, k, v, g = inputs(decay, B=1, T=70)
    cu = torch.tensor([0, 9, 50, 70], dtype=torch.int32)
    s0 = torch.randn(3, 3, 8, 5)
    o, s = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    for n in range(3):
        a, b = cu[n].item(), cu[n + 1].item()
        ref_o, ref_s = naive(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b] if g is not None else None, 8**-0.5, s0[n : n + 1]
        )
        torch.testing.assert_close(o[:, a:b].double(), ref_o, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s[n : n + 1].double(), ref_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay", ["channel", "head", "none"])
def test_step_continues_the_chunked_state(decay):
    q, k, v, g = inputs(decay, T=20)
    _, state = gated_linear_attention(
        q[:, :19], k[:, :19], v[:, :19], g[:, :19] if g is not None else None, output_final_state=True
    )
    o = gated_linear_step(q[:, 19:], k[:, 19:], v[:, 19:], g[:, 19:] if g is not None else None, 8**-0.5, state)
    ref_o, ref_s = naive(q, k, v, g, 8**-0.5)
    torch.testing.assert_close(o[:, 0].double(), ref_o[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), ref_s, rtol=1e-4, atol=1e-4)


def test_gradients_match_the_token_loop():
    q, k, v, g = (t.double().requires_grad_() for t in inputs("channel", B=1, T=40))
    o, _ = gated_linear_attention(q, k, v, g)
    ref, _ = naive(q, k, v, g, 8**-0.5)
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad((o.double() * grad).sum(), (q, k, v, g))
    theirs = torch.autograd.grad((ref * grad).sum(), (q, k, v, g))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tilelang_usable", [False, True])
def test_only_a_trained_per_head_decay_at_the_miscompiled_tile_avoids_fla(monkeypatch, tilelang_usable):
    """Where fla refuses its gated backward (Hopper, Triton < 3.7.1), training Mamba2's per-head decay takes the
    PyTorch path only at K <= 64 (the miscompiled BK = 64 tile); inference and per-channel decays always run fla.
    A usable TileLang changes nothing: fla's TileLang kernel never takes simple GLA's float32 states."""
    from ivl.kernels import _fla, gated_linear

    def refused(tilelang_can_take_it=True):
        return not (tilelang_usable and tilelang_can_take_it)

    monkeypatch.setattr(_fla, "fla_gated_backward_is_refused", refused)

    def may_run(K, g_shape, grad):
        q, k, v = (torch.zeros(1, 4, 2, K, requires_grad=grad) for _ in range(3))
        g = torch.zeros(g_shape(K), requires_grad=grad)
        return gated_linear._fla_may_run(q, k, v, g, None)

    head, channel = (lambda K: (1, 4, 2)), (lambda K: (1, 4, 2, K))
    assert may_run(128, head, grad=True) and not may_run(64, head, grad=True)
    assert may_run(64, head, grad=False) and may_run(64, channel, grad=True)


@pytest.mark.parametrize(
    "K, V, runs_fla", [(16, 32, False), (16, 256, False), (64, 32, False), (64, 64, True), (128, 256, True)]
)
def test_per_channel_decay_below_fla_s_smallest_tiles_takes_the_pytorch_path(K, V, runs_fla):
    """fla's chunk_gla crashed on H100s at K 16, V 32 (its tiles: keys 32 or 64, values 64 or 128); smaller
    shapes than its tiles run the PyTorch path, training or not; the 4B and SmolLM2 shapes keep fla."""
    from ivl.kernels import gated_linear

    for grad in (False, True):
        q, k = (torch.zeros(1, 4, 2, K, requires_grad=grad) for _ in range(2))
        v = torch.zeros(1, 4, 2, V, requires_grad=grad)
        g = torch.zeros(1, 4, 2, K, requires_grad=grad)
        assert gated_linear._fla_may_run(q, k, v, g, None) == runs_fla
