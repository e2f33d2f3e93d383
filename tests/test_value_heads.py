"""A wide value head as narrow value heads sharing q and k (fla's grouped-value layout), against the per-token loop."""

import torch
import torch.nn.functional as F
from references import naive_gated_delta

from ivl.kernels.value_heads import merge_value_heads, split_value_heads, splits


def grouped_value_loop(q, k, v, g, beta, initial_state):
    """fla's documented convention for HV > H value heads: value head i reads query/key head i // (HV / H)."""
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    return naive_gated_delta(q, k, v, g, beta, initial_state=initial_state)


def test_split_heads_give_the_wide_heads_outputs_states_and_gradients():
    torch.manual_seed(0)
    B, T, H, K, width, n = 2, 23, 3, 8, 4, 3
    q = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, n * width, dtype=torch.float64, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64) + 2).requires_grad_()
    beta = torch.rand(B, T, H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, K, n * width, dtype=torch.float64, requires_grad=True)
    inputs = (q, k, v, g, beta, h0)
    w_o, w_s = torch.randn(B, T, H, n * width, dtype=torch.float64), torch.randn_like(h0)

    def loss(o, s):
        return (o * w_o).sum() + (s * w_s).sum()

    o_ref, s_ref = naive_gated_delta(*inputs[:5], initial_state=h0)
    grads_ref = torch.autograd.grad(loss(o_ref, s_ref), inputs)

    v2, g2, beta2, h02 = split_value_heads(v, g, beta, h0, width)
    assert v2.shape == (B, T, H * n, width) and h02.shape == (B, H * n, K, width)
    o, s = merge_value_heads(*grouped_value_loop(q, k, v2, g2, beta2, h02), H)
    grads = torch.autograd.grad(loss(o, s), inputs)

    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    for name, a, b in zip("q k v g beta h0".split(), grads, grads_ref):
        torch.testing.assert_close(a, b, msg=name)


def test_only_whole_multiples_are_split():
    assert splits(256, 128) and not splits(128, 128) and not splits(192, 128) and not splits(256, None)
