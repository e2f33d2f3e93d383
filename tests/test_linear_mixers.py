"""The linear mixers (Gated DeltaNet, Mamba2, GLA, linear attention) under the one mixer contract: each against a
per-token loop written from its paper's equations, and each through the contract's paths (cached chunks, packed
sequences, left padding, fixed-shape decoding, one compiled graph per block, checkpoints)."""

import pytest
import torch
import torch.nn.functional as F

from ivl.model import HybridConfig, HybridLM
from ivl.model.mixers import LINEAR_MIXERS, mixer_class

KINDS = list(LINEAR_MIXERS)


def random_layer(kind: str, seed: int = 0):
    """A float64 layer of the tiny shapes, moved away from its near pass-through initialisation so that gates,
    decays and convolutions all matter."""
    torch.manual_seed(seed)
    layer = mixer_class(kind)(HybridConfig.tiny(linear_mixer=kind), 1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def assert_close(got, expected):
    # The layers are float64; the recurrences accumulate in float32 inside (as on the GPU).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def naive_gla(layer, x, forgets=True):
    """S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(K), token by token; gated RMSNorm, o_proj."""
    B, T, _ = x.shape
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    q = (x @ layer.q_proj.weight.T).view(B, T, H, K)
    k = (x @ layer.k_proj.weight.T).view(B, T, H, K)
    v = (x @ layer.v_proj.weight.T).view(B, T, H, V)
    gate = (x @ layer.g_proj.weight.T).view(B, T, H, V)
    if forgets:
        down, up = layer.gk_proj
        gk = F.logsigmoid(x @ down.weight.T @ up.weight.T + up.bias).view(B, T, H, K) / 16
    S = torch.zeros(B, H, K, V, dtype=x.dtype)
    out = []
    for t in range(T):
        if forgets:
            S = gk[:, t].exp()[..., None] * S
        S = S + k[:, t, ..., None] * v[:, t, :, None, :]
        o = torch.einsum("bhk,bhkv->bhv", q[:, t] * K**-0.5, S)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.o_norm.weight * F.silu(gate[:, t])
        out.append(o.reshape(B, H * V))
    return torch.stack(out, 1) @ layer.o_proj.weight.T


def naive_mamba2(layer, x):
    """Mamba2 as mamba_ssm's reference states it: state [P, N] per head, S_t = exp(A dt_t) S_{t-1} + dt_t x_t B_t^T,
    y_t = S_t C_t + D x_t; out_proj(groupwise RMSNorm(y * SiLU(z)))."""
    B, T, _ = x.shape
    G, N, nH, P = layer.num_groups, layer.state_dim, layer.num_heads, layer.head_dim
    inner = nH * P
    z, xBC, dt = (x @ layer.in_proj.weight.T).split([inner, inner + 2 * G * N, nH], -1)
    W = layer.conv1d.kernel_size
    xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (W - 1, 0)), layer.conv1d.weight, groups=xBC.shape[-1]))
    xs, Bs, Cs = xBC.transpose(1, 2).split([inner, G * N, G * N], -1)
    xs, Bs, Cs = xs.view(B, T, nH, P), Bs.view(B, T, G, N), Cs.view(B, T, G, N)
    dt = F.softplus(dt + layer.dt_bias)
    A = -layer.A_log.exp()
    S = torch.zeros(B, nH, P, N, dtype=x.dtype)
    ys = []
    for t in range(T):
        y = torch.empty(B, nH, P, dtype=x.dtype)
        for h in range(nH):
            g = h // (nH // G)
            S[:, h] = (dt[:, t, h] * A[h]).exp()[:, None, None] * S[:, h] + dt[:, t, h, None, None] * xs[
                :, t, h, :, None
            ] * Bs[:, t, g, None, :]
            y[:, h] = (S[:, h] @ Cs[:, t, g, :, None])[..., 0] + layer.D[h] * xs[:, t, h]
        ys.append(y.reshape(B, inner))
    y = (torch.stack(ys, 1) * F.silu(z)).view(B, T, G, -1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.norm_weight.view(G, -1)
    return y.reshape(B, T, inner) @ layer.out_proj.weight.T


@pytest.mark.parametrize("kind", ["gla", "linear_attention", "mamba2"])
def test_layer_equals_the_papers_per_token_recurrence(kind):
    layer = random_layer(kind)
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    expected = naive_mamba2(layer, x) if kind == "mamba2" else naive_gla(layer, x, forgets=kind == "gla")
    with torch.no_grad():
        assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_chunks_then_decode_equal_the_full_forward(kind):
    layer = random_layer(kind)
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(None)
        pieces = [layer(x[:, a:b], cache=cache) for a, b in ((0, 20), (20, 23), (23, 40))]
        pieces += [layer(x[:, t : t + 1], cache=cache) for t in range(40, 50)]
    assert_close(torch.cat(pieces, 1), full)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequences_equal_separate_ones(kind):
    layer = random_layer(kind)
    x = torch.randn(1, 50, 64, dtype=torch.float64)
    cu = torch.tensor([0, 13, 14, 50], dtype=torch.int32)
    with torch.no_grad():
        packed = layer(x, cu_seqlens=cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert_close(packed[:, a:b], layer(x[:, a:b]))


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_each_prompt_alone_and_continues_alike(kind):
    layer = random_layer(kind)
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    nxt = torch.randn(2, 1, 64, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.new_cache(None)
        batch = layer(x, cache=cache, attention_mask=mask)
        step = layer(nxt, cache=cache)
        for row, start in ((0, 0), (1, 7)):
            alone_cache = layer.new_cache(None)
            alone = layer(x[row : row + 1, start:], cache=alone_cache)
            assert_close(batch[row : row + 1, start:], alone)
            assert_close(step[row : row + 1], layer(nxt[row : row + 1], cache=alone_cache))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_size_does_not_grow_with_the_stream(kind):
    layer = random_layer(kind)
    cache = layer.new_cache(None)
    sizes = []
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(1, 64, 64, dtype=torch.float64), cache=cache)
            sizes.append(sum(t.numel() for t in cache.tensors()))
    assert sizes[0] == sizes[1] == sizes[2]


def mixed_lm(dtype=torch.float64) -> HybridLM:
    """Every mixer in one model, away from its initialisation."""
    torch.manual_seed(0)
    lm = HybridLM(HybridConfig.tiny(num_layers=5, layer_types=["attention", *KINDS])).to(dtype).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".mixer." in name:
                p.add_(0.1 * torch.randn_like(p))
    return lm


def test_static_decode_steps_equal_the_cached_forward_for_every_mixer():
    from ivl.model.decoding.static_cache import StaticCache, decode_step

    lm = mixed_lm()
    ids = torch.randint(0, 256, (2, 40))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = lm.new_cache()
        lm(ids[:, :30], position_ids=positions, attention_mask=mask, cache=cache)
        static = StaticCache.from_cache(lm, cache, 2)
        for s in range(30, 40):
            pos = (positions[:, -1] + 1 + s - 30)[None, :, None].expand(3, -1, 1)
            expected = lm(ids[:, s : s + 1], position_ids=pos, cache=cache)[:, 0]
            assert_close(decode_step(lm, static, ids[:, s], pos, torch.tensor(s)), expected)


def test_every_block_step_traces_into_one_graph():
    """The CUDA-graph decoder compiles each block's step whole (fullgraph): a graph break in any mixer's step
    would fail there, so trace every mixer's block here (Dynamo only, on the CPU)."""
    import torch._dynamo

    from ivl.model.decoding import static_cache
    from ivl.model.decoding.packing import pack_projections
    from ivl.model.decoding.static_cache import StaticCache

    lm = mixed_lm(torch.float32)
    cache = StaticCache(lm, 1)
    h = torch.randn(1, 1, 64)
    cos, sin = lm.rotary(torch.zeros(3, 1, 1, dtype=torch.long), h.dtype)
    torch._dynamo.reset()
    traced = torch.compile(static_cache._block_step.eager, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        for block, buffers, packed in zip(lm.layers, cache.layers, pack_projections(lm)):
            m = block.mixer
            args = (h, block.mixer_norm.weight, block.mlp_norm.weight, m.step_weights(packed))
            rest = (
                cos,
                sin,
                torch.tensor([0]),
                packed["gate_up"],
                block.mlp.down_proj.weight,
                1e-6,
                type(m).step,
                m.step_sizes(),
            )
            expected = static_cache._block_step.eager(*args, {k: t.clone() for k, t in buffers.items()}, *rest)
            torch.testing.assert_close(traced(*args, buffers, *rest), expected)


def test_every_mixer_trains_and_saves(tmp_path):
    from ivl.model import checkpoint

    lm = mixed_lm(torch.float32)
    ids = torch.randint(0, 256, (2, 24))
    lm(ids).logsumexp(-1).mean().backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    checkpoint.save(lm, {"text": lm.config.to_dict()}, tmp_path)
    fresh = HybridLM(HybridConfig.from_dict(checkpoint.read_config(tmp_path)[0]["text"]))
    assert fresh.config.layer_types == lm.config.layer_types
    checkpoint.load_into(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), lm(ids), rtol=0, atol=0)


def test_linear_mixers_match_gated_deltanet_in_parameters_and_state_at_4b():
    config = HybridConfig.preset("infinitevl-4b")
    with torch.device("meta"):
        layers = {kind: mixer_class(kind)(config, 1) for kind in KINDS}
    params = {kind: sum(p.numel() for p in layer.parameters()) for kind, layer in layers.items()}
    state = {kind: torch.Size(layer.state_shape()).numel() for kind, layer in layers.items()}
    for kind in KINDS:
        assert abs(params[kind] / params["gated_deltanet"] - 1) < 0.005, params
        assert state[kind] == state["gated_deltanet"], state


def test_linear_mixer_picks_the_non_attention_layers():
    config = HybridConfig.tiny(num_layers=8, hybrid_ratio=0.25, linear_mixer="gla")
    assert config.layer_types == ["attention", "gla", "gla", "gla"] * 2
    assert HybridConfig.tiny(linear_mixer="gdn").layer_types[1] == "gated_deltanet"
    assert HybridConfig.tiny(layer_types=["attention", "gdn", "mamba2", "gla"]).layer_types[1] == "gated_deltanet"
    with pytest.raises(ValueError, match="linear_mixer.*'mamba3' is not a known mixer"):
        HybridConfig.tiny(linear_mixer="mamba3")
    with pytest.raises(ValueError, match="linear_mixer must be one of"):
        HybridConfig.tiny(linear_mixer="attention")


@pytest.mark.parametrize("kind", KINDS)
def test_nan_at_padding_never_enters_the_state(kind):
    """Whatever an earlier layer leaves at padding (CUDA's masked attention can leave NaN there), a left-padded
    row's real tokens give what they give alone: padding enters as zeros, not as input x 0 (NaN x 0 is NaN)."""
    layer = random_layer(kind)
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    x[1, :7] = float("nan")
    with torch.no_grad():
        batch = layer(x, attention_mask=mask)
        assert_close(batch[1:, 7:], layer(x[1:, 7:]))


def test_decode_matrices_are_the_weights_each_step_multiplies(monkeypatch):
    """``decode_matrices`` (what ``ivl.bench gemv`` times) lists exactly the weight matrices every mixer's decode
    step passes to ``linear``, with the packed shapes it reads them in."""
    import sys
    from collections import Counter

    from ivl.model.decoding.packing import pack_projections
    from ivl.model.decoding.static_cache import StaticCache

    lm = mixed_lm(torch.float32)
    read = Counter()
    for module in {sys.modules[type(block.mixer).step.__module__] for block in lm.layers}:

        def recording(x, weight, bias=None, _linear=module.linear):
            read[tuple(weight.shape)] += 1
            return _linear(x, weight, bias)

        monkeypatch.setattr(module, "linear", recording)
    x = torch.randn(2, 1, 64)
    cos, sin = lm.rotary(torch.zeros(3, 2, 1, dtype=torch.long), x.dtype)
    with torch.no_grad():
        for block, buffers, packed in zip(lm.layers, StaticCache(lm, 2).layers, pack_projections(lm)):
            read.clear()
            m = block.mixer
            type(m).step(x, m.step_weights(packed), buffers, cos, sin, torch.tensor([0, 0]), m.step_sizes())
            assert Counter((d.rows, d.cols) for d in m.decode_matrices()) == read, block.layer_type


@pytest.mark.parametrize("kind", ["attention", *KINDS])
def test_flops_per_token_are_two_per_weight_plus_the_core(kind):
    config = HybridConfig.preset("infinitevl-4b", linear_mixer=kind if kind != "attention" else "gated_deltanet")
    with torch.device("meta"):
        mixer = mixer_class(kind)(config, 0 if kind == "attention" else 1)
    weights = sum(p.numel() for p in mixer.parameters() if p.dim() == 2)
    core = mixer.core_flops_per_token(4096)
    assert core > 0 and mixer.flops_per_token(4096) == 2 * weights + core
    if kind == "attention":  # over the keys a query sees: more of them with length, never more than the window
        assert mixer.core_flops_per_token(1024) < core < mixer.core_flops_per_token(65536) < 4 * 16 * 128 * 8192
    else:  # constant per token once a sequence fills a chunk, smaller within one
        assert mixer.core_flops_per_token(32768) == core > mixer.core_flops_per_token(16)
    if kind == "gated_deltanet":  # fla's chunked delta rule: 16 heads of 128 x 256, chunks of 64; 4-tap convolutions
        assert core == 16 * (6 * 128 * 256 + 2 * 64 * (2 * 128 + 256)) + 2 * 4 * (2 * 2048 + 4096)
