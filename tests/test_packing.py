"""Packed projections: the parameters become row blocks of one matrix without changing what the model computes."""

import torch
from test_hybrid_lm import tiny_lm

from ivl.model import checkpoint
from ivl.model.decoding.packing import pack_projections


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_packing_keeps_values_and_makes_parameters_views():
    model = tiny_lm()
    ids = torch.randint(0, 256, (2, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _logits(model, ids)
    packed = pack_projections(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    gdn = model.layers[1].mixer  # layer 0 is attention
    matrix = packed[1]["mixer_in"]
    rows = [gdn.q_proj, gdn.k_proj, gdn.v_proj, gdn.g_proj, gdn.a_proj, gdn.b_proj]
    assert matrix.shape[0] == sum(layer.weight.shape[0] for layer in rows)
    torch.testing.assert_close(
        matrix,
        torch.cat(
            [before[f"layers.1.mixer.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")]
        ),
    )
    assert gdn.b_proj.weight.data_ptr() == matrix.data_ptr() + (matrix.shape[0] - gdn.num_heads) * matrix.shape[1] * 4
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)


def test_packing_again_reuses_the_matrices_and_repacks_after_to():
    model = tiny_lm()
    first = pack_projections(model)
    again = pack_projections(model)
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        assert all(a[k].data_ptr() == b[k].data_ptr() and a[k].shape == b[k].shape for k in a)
    model.to(torch.float64)  # reallocates every parameter
    repacked = pack_projections(model)
    assert repacked[1]["gate_up"].dtype == torch.float64
    assert model.layers[1].mlp.up_proj.weight.data_ptr() > repacked[1]["gate_up"].data_ptr()
    assert model.layers[1].mlp.gate_proj.weight.data_ptr() == repacked[1]["gate_up"].data_ptr()


def test_packed_model_trains_and_saves(tmp_path):
    model = tiny_lm()
    pack_projections(model)
    ids = torch.randint(0, 256, (2, 12))
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    checkpoint.save(model, {"text": model.config.to_dict()}, tmp_path)
    fresh = tiny_lm()
    checkpoint.load_into(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=0)
