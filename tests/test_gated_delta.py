import pytest
import torch
import torch.nn.functional as F
from references import naive_gated_delta

from ivl.kernels.gated_delta import gated_delta_rule


def make_inputs(B=2, T=100, H=3, K=8, V=12, requires_grad=False):
    q = F.normalize(torch.randn(B, T, H, K), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H) + 2)  # decays between ~0.5 and 1, some much stronger
    beta = torch.rand(B, T, H)
    tensors = [q, k, v, g, beta]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("T", [1, 5, 64, 100, 129])
def test_matches_naive_loop(T):
    q, k, v, g, beta = make_inputs(T=T)
    o, state = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o_ref, state_ref = naive_gated_delta(q, k, v, g, beta)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.double(), state_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [1, 70])
def test_initial_state_and_scale(T):
    q, k, v, g, beta = make_inputs(T=T)
    h0 = torch.randn(2, 3, 8, 12)
    o, state = gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True)
    o_ref, state_ref = naive_gated_delta(q, k, v, g, beta, scale=0.7, initial_state=h0)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.double(), state_ref, rtol=1e-4, atol=1e-5)


def test_final_state_only_when_asked():
    q, k, v, g, beta = make_inputs(T=10)
    assert gated_delta_rule(q, k, v, g, beta)[1] is None


def test_split_sequence_continues_from_state():
    """Running two halves with the state handed over equals one run: what chunked prefill relies on."""
    q, k, v, g, beta = make_inputs(T=90)
    o_full, s_full = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o1, s1 = gated_delta_rule(*(t[:, :37] for t in (q, k, v, g, beta)), output_final_state=True)
    o2, s2 = gated_delta_rule(*(t[:, 37:] for t in (q, k, v, g, beta)), initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s2, s_full, rtol=1e-4, atol=1e-5)


def test_varlen_equals_separate_sequences():
    lengths = [37, 1, 64, 90]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, g, beta = make_inputs(B=1, T=sum(lengths))
    h0 = torch.randn(len(lengths), 3, 8, 12)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_ref, s_ref = naive_gated_delta(*(t[:, a:b] for t in (q, k, v, g, beta)), initial_state=h0[n : n + 1])
        torch.testing.assert_close(o[:, a:b].double(), o_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[n : n + 1].double(), s_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [1, 70])
def test_gradients_match_naive_loop(T):
    inputs = make_inputs(T=T, requires_grad=True)
    h0 = torch.randn(2, 3, 8, 12, requires_grad=True)
    w_o, w_s = torch.randn(2, T, 3, 12), torch.randn(2, 3, 8, 12)

    o, s = gated_delta_rule(*inputs, initial_state=h0, output_final_state=True)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), [*inputs, h0])
    o_ref, s_ref = naive_gated_delta(*inputs, initial_state=h0)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), [*inputs, h0])
    for name, got, want in zip(["q", "k", "v", "g", "beta", "h0"], grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"gradient of {name}: {m}")


def test_bfloat16_inputs_keep_dtype_and_accuracy():
    q, k, v, g, beta = make_inputs(T=80)
    o, state = gated_delta_rule(*(t.bfloat16() for t in (q, k, v)), g, beta.bfloat16(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, _ = naive_gated_delta(*(t.bfloat16() for t in (q, k, v)), g, beta.bfloat16())
    torch.testing.assert_close(o.double(), o_ref, rtol=2e-2, atol=2e-2)


def test_bad_shapes_are_named():
    q, k, v, g, beta = make_inputs(T=10)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, k, v, g, beta[:, :5])
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(2, 3, 12, 8))
    with pytest.raises(ValueError, match="B == 1"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


def test_a_gpu_without_fla_is_told_once_that_the_linear_mixers_run_their_pytorch_path(monkeypatch, capsys):
    """Every fla probe runs only for CUDA tensors; the first one that finds no fla says so, once per process."""
    import importlib

    from ivl.kernels import _fla

    real = importlib.import_module

    def without_fla(name, *args, **kwargs):
        if name.startswith("fla"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_fla.importlib, "import_module", without_fla)
    monkeypatch.delenv("IVL_DISABLE_FLA", raising=False)
    _fla._say_fla_is_missing.cache_clear()
    try:
        assert _fla._optional("IVL_DISABLE_FLA", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule") is None
        assert _fla._optional("IVL_DISABLE_FLA", "fla.ops.gla", "chunk_gla") is None
    finally:
        _fla._say_fla_is_missing.cache_clear()
    err = capsys.readouterr().err
    assert err.count("flash-linear-attention is not installed") == 1, err
    assert "PyTorch path" in err and 'pip install -e ".[gpu]"' in err
