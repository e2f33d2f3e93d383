import math

import torch
import torch.nn.functional as F

from ivl.model import HybridConfig
from ivl.model.layers import MultimodalRotaryEmbedding, apply_rotary
from ivl.model.mixers.gated_deltanet import GatedDeltaNet
from ivl.model.mixers.short_convolution import ShortConvolution


def test_short_convolution_matches_conv1d():
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 11, 6)
    y, tail = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, groups=6)
    torch.testing.assert_close(y, F.silu(ref).transpose(1, 2))
    torch.testing.assert_close(tail, x[:, -3:])


def test_short_convolution_varlen_and_tail():
    conv = ShortConvolution(6, 4)
    a, b = torch.randn(1, 5, 6), torch.randn(1, 2, 6)
    packed, _ = conv(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))
    torch.testing.assert_close(packed, torch.cat([conv(a)[0], conv(b)[0]], 1))
    # continuing from a tail equals running the concatenation
    y1, tail = conv(a[:, :3])
    y2, _ = conv(a[:, 3:], tail=tail)
    torch.testing.assert_close(torch.cat([y1, y2], 1), conv(a)[0])


def test_mimic_initialisation():
    layer = GatedDeltaNet(HybridConfig.tiny(), 1)
    x = torch.randn(1, 5, layer.q_proj.in_features)
    # identity short convolutions: silu(x) of the current token only
    y, _ = layer.q_conv1d(x @ layer.q_proj.weight.T)
    torch.testing.assert_close(y, F.silu(x @ layer.q_proj.weight.T))
    beta = layer.b_proj(x).sigmoid()
    decay = torch.exp(-layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias))
    torch.testing.assert_close(beta, torch.full_like(beta, 0.5))
    torch.testing.assert_close(decay, torch.full_like(decay, math.exp(-1e-3)), rtol=1e-6, atol=1e-6)


def test_text_positions_reduce_to_plain_rope():
    """Same position on all three axes = 1D RoPE: dims (i, i + D/2) rotate by pos * theta^(-2i/D)."""
    D, theta = 16, 10_000.0
    rope = MultimodalRotaryEmbedding(D, theta, [2, 3, 3])
    pos = torch.arange(7)
    cos, sin = rope(pos[None, None].expand(3, 1, -1), torch.float32)
    x = torch.randn(1, 7, 2, D)
    out = apply_rotary(x, cos, sin)
    freqs = theta ** (-torch.arange(0, D, 2).double() / D)
    angle = pos[:, None].double() * freqs  # [T, D/2]
    z = (
        torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double())
        * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    )
    torch.testing.assert_close(out.double(), torch.cat([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)


def test_each_axis_drives_its_own_frequencies():
    rope = MultimodalRotaryEmbedding(16, 10_000.0, [2, 3, 3])
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    moved = base.clone()
    moved[1] = 5  # move the height axis only
    cos0, _ = rope(base, torch.float32)
    cos1, _ = rope(moved, torch.float32)
    changed = (cos0 != cos1)[0, 0, :8]
    assert changed.tolist() == [False, False, True, True, True, False, False, False]


def _gdn_outputs(layer, x, cu_seqlens=None, cache=None):
    layer.zero_grad()
    y = layer(x, cu_seqlens=cu_seqlens, cache=cache)
    y.square().sum().backward()
    return y, {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_long_inputs_project_at_once_and_match_the_per_projection_layer(monkeypatch):
    """Training-length inputs run the six input projections as two products and the three convolutions as one
    call; outputs, gradients and the cache they leave must be those of the layer run projection by projection."""
    import ivl.model.mixers.gated_deltanet as gdn
    from ivl.model.cache import RecurrentCache

    torch.manual_seed(0)
    layer = GatedDeltaNet(HybridConfig.tiny(), 1).double()
    with torch.no_grad():  # away from the mimic initialisation, so that every parameter matters
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 300, layer.q_proj.in_features, dtype=torch.float64)
    cu = torch.tensor([0, 120, 300], dtype=torch.int32)
    results = {}
    for name, threshold in (("one by one", 10**9), ("at once", 1)):
        monkeypatch.setattr(gdn, "PROJECT_AT_ONCE_MIN_TOKENS", threshold)
        assert layer._projects_at_once(x) == (name == "at once")
        cache = RecurrentCache()
        layer(x[:, :280], cache=cache)  # a prefill leaves a state and convolution tails ...
        continued, _ = _gdn_outputs(layer, x[:, 280:], cache=cache)  # ... which a short continuation reads
        results[name] = (*_gdn_outputs(layer, x, cu_seqlens=cu), cache.state, cache.conv, continued)
    (y1, g1, s1, c1, n1), (y2, g2, s2, c2, n2) = results["one by one"], results["at once"]
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(s2, s1, rtol=1e-12, atol=1e-12)
    for key in "qkv":
        torch.testing.assert_close(c2[key], c1[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n2, n1, rtol=1e-12, atol=1e-12)


def test_lora_wrapped_projections_run_one_by_one():
    from ivl.stages import lora

    layer = GatedDeltaNet(HybridConfig.tiny(), 1)
    holder = torch.nn.ModuleDict({"mixer": layer})
    lora.inject(holder, lora.lora_config(4, 8))
    assert not holder["mixer"]._projects_at_once(torch.zeros(1, 4096, layer.q_proj.in_features))
