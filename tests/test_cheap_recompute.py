"""Cheap activations handed to autograd as recipes in the blocks that activation checkpointing keeps."""

import copy
import weakref

import pytest
import torch
from test_training_at_scale import with_random_adapters

from ivl.model.training import cheap_recompute
from ivl.model.training.cheap_recompute import cheap, recording_cheap_activations
from ivl.stages import distributed
from ivl.stages.models import load_student


def counted(fn, calls):
    def run(*args):
        calls.append(fn.__name__)
        return fn(*args)

    run.__name__ = fn.__name__
    return run


def test_a_marked_output_is_not_kept_by_autograd_and_is_recomputed_once():
    calls = []
    double = cheap(counted(lambda x: x * 2, calls))
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with recording_cheap_activations():
        y = double(x)
        # two nodes save y: the product of a 3-D view (a view of y's storage) and a plain product
        out = (y.view(2, 4, 4) @ w).square().sum() + (y @ w).sin().sum()
    held = weakref.ref(y)
    del y
    assert held() is None  # autograd keeps the recipe, not y
    assert len(calls) == 1
    out.backward()
    assert len(calls) == 2  # computed again once for both nodes

    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    y2 = x2 * 2
    ((y2.view(2, 4, 4) @ w2).square().sum() + (y2 @ w2).sin().sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def test_a_recipe_of_a_marked_output_recomputes_it_through_its_own_recipe():
    calls = []
    double = cheap(counted(lambda x: x * 2, calls))
    sine = cheap(counted(torch.sin, calls))
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    with recording_cheap_activations():
        y = double(x)
        z = sine(y[:, 1:])  # sin saves its input, a view of y; the product saves z
        out = (z @ w[1:]).square().sum()
    held = weakref.ref(y)
    del y, z
    assert held() is None
    out.backward()
    assert sorted(calls) == ["<lambda>", "<lambda>", "sin", "sin"]  # each once more, y shared by both recipes

    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    ((torch.sin((x2 * 2)[:, 1:]) @ w2[1:]).square().sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def test_outside_recording_autograd_keeps_the_output_itself():
    calls = []
    double = cheap(counted(lambda x: x * 2, calls))
    x = torch.randn(4, 4, requires_grad=True)
    y = double(x)
    out = (y @ y).sum()
    held = weakref.ref(y)
    del y
    assert held() is not None
    out.backward()
    assert len(calls) == 1


def noting_recipes(monkeypatch) -> list[str]:
    """The names of the functions whose recipes are computed from now on."""
    recomputed = []
    compute = cheap_recompute._Recipe.compute

    def noting(self):
        if self.value is None:
            recomputed.append(getattr(self.fn, "__name__", ""))
        return compute(self)

    monkeypatch.setattr(cheap_recompute._Recipe, "compute", noting)
    return recomputed


def packed_300():
    """Three packed sequences, 300 tokens: long enough for the Gated DeltaNet's projections at once."""
    lengths = (140, 1, 159)
    ids = torch.randint(0, 5000, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "labels": ids, "cu_seqlens": cu}


def test_an_output_changed_in_place_before_it_is_saved_is_kept_as_it_is():
    double = cheap(lambda x: x * 2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with recording_cheap_activations():
        y = double(x)
        y.add_(1)
        (y @ w).square().sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    ((x2 * 2 + 1) @ w2).square().sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_an_input_changed_in_place_after_the_forward_fails_loudly_rather_than_recompute_other_values():
    double = cheap(lambda x: x * 2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with recording_cheap_activations():
        h = x * 1  # nothing saves h itself, so plain autograd would not notice the change below
        out = (double(h) @ w).sum()
    with torch.no_grad():
        h.add_(5)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        out.backward()


def test_an_output_that_is_its_own_input_is_not_a_recipe():
    same = cheap(lambda x: x.contiguous())
    x = torch.randn(4, 4, requires_grad=True)
    with recording_cheap_activations():
        h = x * 3
        out = (same(h) @ h).sum()
    out.backward()  # (noting it as its own recipe would recurse without end)
    x2 = x.detach().requires_grad_()
    h2 = x2 * 3
    (h2 @ h2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_recomputed_under_the_forwards_autocast():
    product = cheap(lambda x, w: x @ w)
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8)
    v = torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), recording_cheap_activations():
        out = (product(x, w) @ v).float().sum()
    out.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x2, v2 = x.detach().requires_grad_(), v.detach().requires_grad_()
        ((x2 @ w) @ v2).float().sum().backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=0, atol=0)


def test_in_mixers_mode_the_checkpointed_mixers_outputs_are_not_held_during_the_mlp():
    model = load_student(None, "tiny", 0.25, 64).train()
    distributed.checkpoint_blocks(model.lm, "mixers")
    held = []
    for block in model.lm.layers:
        block.mlp.register_forward_pre_hook(
            lambda *_: held.append({e[1].__name__ for e in cheap_recompute._recorders()[-1].outputs.values()})
        )
    model.head_losses(**packed_300()).ce.backward()
    assert held == [{"rms_norm"}] * len(model.lm.layers)  # the mixer's and MLP's input norms, nothing from inside


@pytest.mark.parametrize("adapters", [False, True])
def test_kept_blocks_recompute_norms_swiglu_and_convolutions_with_identical_gradients(adapters, monkeypatch):
    plain = load_student(None, "tiny", 0.25, 64).train().double()
    if adapters:
        with_random_adapters(plain)
    kept = copy.deepcopy(plain)
    chosen = distributed.checkpoint_blocks(kept.lm, 0.5)
    assert [kept.lm.layers[i].layer_type for i in range(4) if i not in chosen] == ["attention", "gated_deltanet"]

    recomputed = noting_recipes(monkeypatch)
    batch = packed_300()
    plain.head_losses(**batch).ce.backward()
    kept.head_losses(**batch).ce.backward()
    # (the PyTorch Gated DeltaNet copies the normalised q and k; fla's kernel keeps them: the GPU test below)
    assert {"rms_norm", "silu_mul", "gated_rms_norm", "_conv_output"} <= set(recomputed)
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=name)

    recomputed.clear()
    off = copy.deepcopy(plain)
    distributed.checkpoint_blocks(off.lm, 0.5, recompute_cheap=False)
    off.head_losses(**batch).ce.backward()
    assert recomputed == []


@pytest.mark.gpu
@pytest.mark.parametrize("adapters", [False, True])
def test_on_the_gpu_kept_blocks_also_recompute_the_kernels_qk_norms_and_fla_convolutions(adapters, monkeypatch):
    plain = load_student(None, "tiny", 0.25, 64).train().cuda()
    if adapters:
        with_random_adapters(plain)
    kept = copy.deepcopy(plain)
    distributed.checkpoint_blocks(kept.lm, 0.5)
    recomputed = noting_recipes(monkeypatch)
    batch = {k: v.cuda() for k, v in packed_300().items()}
    plain.head_losses(**batch).ce.backward()
    kept.head_losses(**batch).ce.backward()
    expected = {"rms_norm", "silu_mul", "gated_rms_norm", "_l2norm", "_fla_conv_forward"}
    if not adapters:  # q, k and v projected at once: v is a slice, made contiguous before fla's kernel
        expected.add("contiguous")
    assert expected <= set(recomputed)
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_benchmarks_transformer_layers_recompute_their_norms_and_swiglu_with_identical_gradients(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ivl.bench.baseline_stage import recompute_cheap_in_decoder_layer

    config = Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    plain = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").double()
    kept = copy.deepcopy(plain)
    recompute_cheap_in_decoder_layer(kept.model.layers[1])
    recomputed = noting_recipes(monkeypatch)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    plain(input_ids=ids, labels=ids).loss.backward()
    kept(input_ids=ids, labels=ids).loss.backward()
    assert sorted(recomputed) == ["_activated_product", "forward", "forward"]
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=name)
