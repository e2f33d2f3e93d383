"""GPU fast paths (fla's Triton kernels, FlexAttention / flash-attn) against the PyTorch paths they replace."""

import pytest
import torch
import torch.nn.functional as F
from references import naive_gated_delta, naive_gated_delta_varlen

from ivl.kernels._fla import fla_gated_backward_is_refused, fla_gated_delta
from ivl.kernels.gated_delta import _chunked, _varlen, gated_delta_rule
from ivl.kernels.window_attention import (
    _sdpa,
    band_mask,
    sliding_window_attention,
    sliding_window_attention_after_prefix,
)
from ivl.model import HybridConfig, HybridLM
from ivl.model.layers import apply_rotary, gated_rms_norm, rms_norm, silu_mul
from ivl.model.mixers.gated_deltanet import _l2norm
from ivl.model.mixers.short_convolution import ShortConvolution, _causal_conv_silu

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gdn_inputs(B, T, H, K, V, dtype):
    q = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 4)
    beta = torch.rand(B, T, H, device="cuda", dtype=dtype)
    h0 = torch.randn(B, H, K, V, device="cuda")
    return [t.requires_grad_(True) for t in (q, k, v, g, beta, h0)]


def test_fla_is_installed():
    assert fla_gated_delta() is not None, "install the [gpu] extra: the GPU path would silently be the slow one"


def gdn_case(T, K, dtype, varlen, seed=0):
    """Inputs of one gated delta rule call with an initial state, a random upstream gradient w, and cu_seqlens."""
    torch.manual_seed(seed)
    H, V = 4, 2 * K
    if varlen:
        cu = torch.tensor([0, T // 8, T // 8 + 1, T // 2 + 37, T], dtype=torch.int32, device="cuda")
        q, k, v, g, beta, _ = gdn_inputs(1, T, H, K, V, dtype)
        h0 = torch.randn(4, H, K, V, device="cuda", requires_grad=True)
    else:
        cu = None
        q, k, v, g, beta, h0 = gdn_inputs(2, T, H, K, V, dtype)
    w = torch.randn(*v.shape, device="cuda")
    return (q, k, v, g, beta, h0), cu, w


def gdn_grads(fn, inputs, cu, w):
    o, s = fn(inputs, cu)
    return (o, s), torch.autograd.grad((o.float() * w).sum() + s.float().sum(), inputs)


def ours(inputs, cu):
    return gated_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True, cu_seqlens=cu)


def naive_float32(inputs, cu):
    q, k, v, g, beta, h0 = inputs
    if cu is not None:
        return naive_gated_delta_varlen(q, k, v, g, beta, cu, initial_state=h0, dtype=torch.float32)
    return naive_gated_delta(q, k, v, g, beta, initial_state=h0, dtype=torch.float32)


@pytest.mark.parametrize("K", [128, 64])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("varlen", [False, True])
def test_gated_delta_gradients_match_naive_float32_recurrence(K, dtype, tol, varlen):
    """Outputs, final states and every gradient (q, k, v, g, beta, initial state) of the path training takes on
    this machine (fla's own backward at K = 128; at K = 64 on Hopper with Triton < 3.7.1, the PyTorch backward)
    against a per-token float32 loop: a reference that shares no code with either."""
    inputs, cu, w = gdn_case(512, K, dtype, varlen)
    outs, grads = gdn_grads(ours, inputs, cu, w)
    outs_ref, grads_ref = gdn_grads(naive_float32, inputs, cu, w)
    for name, a, b in zip(["o", "state"], outs, outs_ref):
        assert rel_err(a, b) < tol, name
    for name, a, b in zip("q k v g beta h0".split(), grads, grads_ref):
        assert rel_err(a, b) < 2 * tol, name


@pytest.mark.parametrize("T", [8192, 32768])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_backward_at_k128_matches_float32_chunked_reference_up_to_32k(T, dtype, tol, varlen):
    """Long sequences at InfiniteVL's key width: fla's own backward (refused by fla 0.6 on this Hopper/Triton pair,
    run by ivl because K = 128 uses the correct BK = 128 tile) against the float32 chunked PyTorch implementation,
    which at K = 128 no GPU path uses for gradients (itself tested against the per-token loop on the CPU)."""
    inputs, cu, w = gdn_case(T, 128, dtype, varlen)
    outs, grads = gdn_grads(ours, inputs, cu, w)
    assert "FlaForwardTorchBackward" not in type(outs[0].grad_fn).__name__

    def chunked_float32(inputs, cu):
        q, k, v, g, beta, h0 = inputs
        q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
        if cu is not None:
            return _varlen(q, k, v, g, beta, 128**-0.5, h0, True, cu)
        return _chunked(q, k, v, g, beta, 128**-0.5, h0)

    outs_ref, grads_ref = gdn_grads(chunked_float32, inputs, cu, w)
    for name, a, b in zip(["o", "state"], outs, outs_ref):
        assert rel_err(a, b) < tol, name
    for name, a, b in zip("q k v g beta h0".split(), grads, grads_ref):
        assert rel_err(a, b) < 2 * tol, name


@pytest.mark.parametrize("varlen", [False, True])
def test_value_heads_of_128_match_naive_float32_recurrence(monkeypatch, varlen):
    """InfiniteVL's heads (K 128, V 256) through fla as 2 value heads of 128 each (the layout FlashQLA takes when
    installed): outputs, states and gradients against the per-token float32 loop."""
    import ivl.kernels.gated_delta as gated_delta

    monkeypatch.setattr(gated_delta, "VALUE_HEAD_WIDTH", 128)
    inputs, cu, w = gdn_case(512, 128, torch.bfloat16, varlen)
    outs, grads = gdn_grads(ours, inputs, cu, w)
    outs_ref, grads_ref = gdn_grads(naive_float32, inputs, cu, w)
    for name, a, b in zip(["o", "state"], outs, outs_ref):
        assert rel_err(a, b) < 2e-2, name
    for name, a, b in zip("q k v g beta h0".split(), grads, grads_ref):
        assert rel_err(a, b) < 4e-2, name


def test_training_path_is_fla_backward_exactly_where_its_tile_is_correct():
    """K = 128 never takes the slow PyTorch backward; K = 64 takes it only where fla's BK = 64 tile is miscompiled."""
    for K in (128, 64):
        inputs, cu, _ = gdn_case(256, K, torch.bfloat16, False)
        o, _ = ours(inputs, cu)
        slow = "FlaForwardTorchBackward" in type(o.grad_fn).__name__
        assert slow == (K == 64 and fla_gated_backward_is_refused()), K


def test_fla_backward_runs_with_tilelang_turned_off():
    """FLA_TILELANG=0 (or TileLang without nvcc) sends fla's backward to its Triton kernel even with tilelang
    installed; fla then refuses it on Hopper (#640) unless ivl lifts the refusal, so ivl must ask fla's own backend
    whether TileLang will run rather than whether it is installed."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, torch.nn.functional as F\n"
        "from ivl.kernels.gated_delta import gated_delta_rule\n"
        "q, k = (F.normalize(torch.randn(1, 256, 2, 128, device='cuda'), dim=-1).bfloat16().requires_grad_() "
        "for _ in range(2))\n"
        "v = torch.randn(1, 256, 2, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
        "g = F.logsigmoid(torch.randn(1, 256, 2, device='cuda') + 4).requires_grad_()\n"
        "beta = torch.rand(1, 256, 2, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
        "o, _ = gated_delta_rule(q, k, v, g, beta)\n"
        "o.float().square().sum().backward()\n"
        "assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v, g, beta))\n"
    )
    env = {**os.environ, "FLA_TILELANG": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_gated_delta_decode_step_on_gpu():
    q, k, v, g, beta, h0 = (t.detach() for t in gdn_inputs(3, 1, 4, 128, 256, torch.float32))
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, s_ref = _chunked(q, k, v, g, beta, 128**-0.5, h0)
    assert rel_err(o, o_ref) < 1e-3 and rel_err(s, s_ref) < 1e-3


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("window", [1024, None])
@pytest.mark.parametrize("varlen", [False, True])
def test_window_attention_gpu_matches_sdpa_band(dtype, tol, window, varlen):
    T, Hq, Hkv, D = 8192, 16, 2, 128
    q = torch.randn(1, T, Hq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, T, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, 3000, 3001, 8192], dtype=torch.int32, device="cuda") if varlen else None
    w = torch.randn(1, T, Hq, D, device="cuda")
    out = sliding_window_attention(q, k, v, window, cu_seqlens=cu)
    grads = torch.autograd.grad((out.float() * w).sum(), [q, k, v])
    ref = _sdpa(*(t.float() for t in (q, k, v)), band_mask(T, window, cu, "cuda"), D**-0.5)
    grads_ref = torch.autograd.grad((ref * w).sum(), [q, k, v])
    assert rel_err(out, ref) < tol
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2 * tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_padded_batch_window_attention_on_gpu_matches_each_row_on_the_cpu(dtype, tol):
    """The padded-batch path of the GPU (real tokens as packed sequences, the varlen kernels) against each row's
    real tokens alone through the CPU's dense band, float32: outputs and gradients, finite everywhere, zero at
    padding. Rows padded on the left far beyond the window, as Stage I's batches are."""
    from ivl.kernels.window_attention import padded_window_attention

    B, T, Hq, Hkv, D, window = 4, 768, 9, 3, 64, 128
    lengths = [768, 86, 300, 2]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    w = torch.randn(B, T, Hq, D)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out = padded_window_attention(*leaves, mask.cuda(), window)
    grads = torch.autograd.grad((out.float() * w.cuda()).sum(), leaves)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    for b, n in enumerate(lengths):
        real = slice(T - n, T)
        alone = [t[b : b + 1, real].clone().requires_grad_() for t in (q, k, v)]
        ref = _sdpa(*alone, band_mask(n, window, None, "cpu"), D**-0.5)
        ref_grads = torch.autograd.grad((ref * w[b : b + 1, real]).sum(), alone)
        assert rel_err(out[b : b + 1, real].cpu(), ref) < tol
        assert not out[b, : T - n].any()
        for g, r in zip(grads, ref_grads):
            assert rel_err(g[b : b + 1, real].cpu(), r) < 2 * tol


@pytest.mark.parametrize("window", [1024, None])
def test_prefix_window_attention_gpu_matches_sdpa_band(window):
    """FlexAttention over a cached prefix (the chunked-prefill path) against SDPA with the explicit band."""
    P, T, Hq, Hkv, D = 1024, 512, 16, 2, 128
    q = torch.randn(1, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, P + T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, P + T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    out = sliding_window_attention_after_prefix(q, k, v, window)
    ref = _sdpa(*(t.float() for t in (q, k, v)), band_mask(P + T, window, None, "cuda")[P:], D**-0.5)
    assert rel_err(out, ref) < 1e-2


def test_fused_functions_match_eager_on_gpu():
    """The torch.compile'd elementwise chains compute what their eager definitions do."""
    x = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
    gate, w = torch.randn_like(x), torch.randn(64, device="cuda")
    cos, sin = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    xc, cw = torch.randn(2, 300, 96, device="cuda", dtype=torch.bfloat16), torch.randn(96, 4, device="cuda")
    tail = torch.randn(2, 3, 96, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([0, 1, 0, 1, 2] * 60, device="cuda")
    cases = [
        (rms_norm, (x, w.bfloat16(), 1e-6)),
        (gated_rms_norm, (x, gate, w, 1e-6)),
        (silu_mul, (x, gate)),
        (apply_rotary, (x, cos[None].expand(2, -1, -1), sin[None].expand(2, -1, -1))),
        (_l2norm, (x,)),
        (_causal_conv_silu, (xc, tail, cw, None)),
        (_causal_conv_silu, (xc, None, cw, pos)),
        (_causal_conv_silu, (xc[:, :1], tail, cw, None)),
    ]
    for fn, args in cases:
        for a, b in zip(*(torch.utils._pytree.tree_leaves(f(*args)) for f in (fn, fn.eager))):
            assert rel_err(a, b) < 1e-2, fn.__name__


@pytest.mark.parametrize("case", ["tail", "no tail", "packed", "short"])
def test_short_convolution_fla_path_matches_tap_loop(case):
    """fla's causal conv (prefill and training on CUDA) against our tap loop, outputs, new tails and gradients."""
    conv = ShortConvolution(256, 4).cuda()
    x = torch.randn(1 if case == "packed" else 2, 2 if case == "short" else 300, 256, device="cuda", requires_grad=True)
    tail = torch.randn(x.shape[0], 3, 256, device="cuda") if case == "tail" else None
    cu = torch.tensor([0, 100, 101, 300], dtype=torch.int32, device="cuda") if case == "packed" else None
    pos = None
    if cu is not None:
        pos = torch.cat([torch.arange(100), torch.arange(1), torch.arange(199)]).cuda()
    y, new_tail = conv(x, cu, tail)
    y_ref, tail_ref = _causal_conv_silu.eager(x, tail, conv.weight[:, 0, :], pos)
    assert rel_err(y, y_ref) < 1e-3 and rel_err(new_tail, tail_ref) == 0
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, conv.weight])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, conv.weight])
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-3


def test_chunked_prefill_on_gpu_equals_one_forward():
    """Prefill in chunks of >= 128 tokens (FlexAttention over the cached window) equals one full forward."""
    model = HybridLM(HybridConfig.tiny(window=200)).cuda().eval()
    ids = torch.randint(0, 256, (2, 700), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        pieces = [model(ids[:, a : a + 175], cache=cache) for a in range(0, 700, 175)]
    assert rel_err(torch.cat(pieces, 1), full) < 5e-3


def test_hybrid_lm_cached_decoding_on_gpu():
    model = HybridLM(HybridConfig.tiny()).cuda().eval()
    ids = torch.randint(0, 256, (2, 50), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        pieces = [model(ids[:, :33], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(33, 50)]
    assert rel_err(torch.cat(pieces, 1), full) < 1e-3


@pytest.mark.parametrize(
    "N, K, bias",
    [(12320, 2048, False), (2048, 11008, False), (2560, 2048, True), (151936, 2048, False), (1000, 300, True)],
)
def test_gemv_matches_float32_product(N, K, bias):
    from ivl.kernels.gemv import linear

    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    x = torch.randn(1, 1, K, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = linear(x, w, b)
    assert out.shape == (1, 1, N) and out.dtype == torch.bfloat16
    # One bf16 rounding of the float32 result (2**-8 relative), as cuBLAS's product has.
    assert rel_err(out, reference) < 5e-3
    assert rel_err(out, reference) < 1.5 * rel_err(F.linear(x, w, b), reference) + 1e-4


def test_gemv_inside_compiled_function_and_cuda_graph():
    from ivl.kernels.gemv import linear

    w1 = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16) / 16
    w2 = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) / 16
    b1 = torch.randn(512, device="cuda", dtype=torch.bfloat16)

    def mlp(x):
        return linear(F.silu(linear(x, w1, b1)), w2)

    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(F.silu(F.linear(x.float(), w1.float(), b1.float())), w2.float())
    compiled = torch.compile(mlp, fullgraph=True, dynamic=False)
    assert rel_err(compiled(x), reference) < 1e-2
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compiled(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = compiled(static_x)
    for _ in range(2):
        x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        reference = F.linear(F.silu(F.linear(x.float(), w1.float(), b1.float())), w2.float())
        assert rel_err(static_out, reference) < 1e-2


def test_gated_deltanet_projecting_at_once_on_gpu_matches_one_by_one(monkeypatch):
    """The training path (two products, one fla convolution over q, k and v) against the per-projection one, on
    fla's kernels: outputs and every parameter's gradient, packed sequences."""
    import ivl.model.mixers.gated_deltanet as gdn
    from ivl.model.mixers.gated_deltanet import GatedDeltaNet

    torch.manual_seed(0)
    layer = GatedDeltaNet(HybridConfig.tiny(), 1).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 600, layer.q_proj.in_features, device="cuda")
    cu = torch.tensor([0, 250, 600], dtype=torch.int32, device="cuda")
    results = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(gdn, "PROJECT_AT_ONCE_MIN_TOKENS", threshold)
        layer.zero_grad()
        y = layer(x, cu_seqlens=cu)
        y.square().sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y1, g1), (y2, g2) = results
    assert rel_err(y2, y1) < 1e-5
    for name in g1:
        assert rel_err(g2[name], g1[name]) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["channel", "head", "none"])
# bf16 (what trains) first: compiling fla's float32 GLA kernels takes minutes per case on a fresh machine
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 5e-3)])
@pytest.mark.parametrize("varlen", [False, True])
def test_gated_linear_attention_on_gpu_matches_the_pytorch_path(decay, dtype, tol, varlen):
    """fla's chunk_gla / chunk_simple_gla (or, where fla refuses a per-head decay's backward, the PyTorch path)
    against the float32 PyTorch path on the CPU (itself tested against a per-token loop): outputs, final states
    and gradients, at 4B widths (K 128; V 256 for GLA, 64 for Mamba2's heads)."""
    from ivl.kernels.gated_linear import gated_linear_attention

    torch.manual_seed(0)
    B, T, H, K, V = (1, 1024, 4, 128, 64) if decay == "head" else (1, 1024, 4, 128, 256)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K) / K**0.5
    v = torch.randn(B, T, H, V)
    g = {"channel": -torch.rand(B, T, H, K) * 0.1, "head": -torch.rand(B, T, H) * 0.1, "none": None}[decay]
    h0 = torch.randn(2 if varlen else B, H, K, V)
    cu = torch.tensor([0, 300, T], dtype=torch.int32) if varlen else None
    w = torch.randn(B, T, H, V)

    def run(device, dt):
        leaves = [t.to(device, dt).requires_grad_() if t is not None else None for t in (q, k, v, g)]
        s0 = h0.to(device).requires_grad_()
        o, s = gated_linear_attention(
            *leaves, initial_state=s0, output_final_state=True, cu_seqlens=cu.to(device) if cu is not None else None
        )
        ((o.float() * w.to(device)).sum() + s.sum()).backward()
        return [o.float().cpu(), s.cpu()], [t.grad.float().cpu() for t in (*leaves, s0) if t is not None]

    outs, grads = run("cuda", dtype)
    outs_ref, grads_ref = run("cpu", torch.float32)
    for a, b in zip(outs, outs_ref):
        assert rel_err(a, b) < tol
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 2 * tol


@pytest.mark.gpu
def test_per_head_decay_training_path_is_fla_backward_exactly_where_its_tile_is_correct():
    """Mamba2's kernel (a per-head decay) trains through fla's own backward at K = 128 and falls back to the
    PyTorch path only at K = 64 where fla's BK = 64 tile is miscompiled; the gradients of the fla path are
    checked against the float32 PyTorch path by the test above."""
    from ivl.kernels.gated_linear import gated_linear_attention

    for K in (128, 64):
        q, k = (torch.randn(1, 256, 2, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
        v = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = (-torch.rand(1, 256, 2, device="cuda") * 0.1).requires_grad_()
        o, _ = gated_linear_attention(q, k, v, g)
        fla_path = "SimpleGla" in type(o.grad_fn).__name__ or "ChunkSimpleGLA" in type(o.grad_fn).__name__
        assert fla_path == (not (K == 64 and fla_gated_backward_is_refused(tilelang_can_take_it=False))), K
        o.float().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v, g)), K


@pytest.mark.parametrize("W", [4, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("packed", [False, True])
def test_short_convolution_backward_kernel_matches_float64_and_fla(W, dtype, tol, packed):
    """ivl's backward kernel, through the training path at Stage II's width (rows and channel blocks that do not
    divide the shape), against autograd through the tap loop in float64, and no worse than fla's own backward."""
    from ivl.kernels import conv_backward
    from ivl.kernels._fla import fla_causal_conv1d
    from ivl.model.mixers.short_convolution import _ConvSilu, sequence_positions, short_convolution

    assert conv_backward.ENABLED
    T, C = 4099, 8192 + 40
    x = torch.randn(1 if packed else 2, T, C, device="cuda").to(dtype).requires_grad_(True)
    w = (torch.randn(C, W, device="cuda") / 2).to(dtype).requires_grad_(True)
    cu = torch.tensor([0, 1, 3, 1000, 1001, 4099], device="cuda", dtype=torch.int32) if packed else None
    pos = torch.arange(T, device="cuda") if cu is None else sequence_positions(cu, T, x.device)
    dy = torch.randn(*x.shape, device="cuda").to(dtype)
    y, _ = short_convolution(x, w, cu)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == _ConvSilu.__name__ + "Backward"
    ours = torch.autograd.grad(y, [x, w], dy)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64, _ = _causal_conv_silu.eager(x64, None, w64, None if cu is None else pos)
    reference = torch.autograd.grad(y64, [x64, w64], dy.double())
    packed_args = {} if cu is None else {"cu_seqlens": cu}
    fla = torch.autograd.grad(fla_causal_conv1d()(x, weight=w, activation="silu", **packed_args)[0], [x, w], dy)
    for name, a, f, r in zip(("dx", "dw"), ours, fla, reference):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert rel_err(a, r) < tol and rel_err(a, r) <= 1.5 * rel_err(f, r) + 1e-6, (name, rel_err(a, r), rel_err(f, r))
