"""Fixed-shape decoding (the CUDA-graph path) against the dynamic cache it replaces."""

import pytest
import torch

from ivl.model.static_cache import StaticCache, decode_step
from test_hybrid_lm import tiny_lm


@pytest.mark.parametrize("prefill", [5, 40])  # the window (16) fills during decoding / was full before it
def test_static_decode_equals_dynamic_decode(prefill):
    model = tiny_lm()
    B, steps = 2, 30
    ids = torch.randint(0, 256, (B, prefill + steps))
    mask = torch.ones(B, prefill, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :prefill], position_ids=positions, attention_mask=mask, cache=cache)
        static = StaticCache.from_cache(model, cache, B)
        before = static.nbytes()
        next_pos = positions[:, -1] + 1
        for s in range(steps):
            token = ids[:, prefill + s]
            pos = (next_pos + s)[None, :, None].expand(3, -1, 1)
            expected = model(token[:, None], position_ids=pos, cache=cache)[:, 0]
            got = decode_step(model, static, token, pos, torch.tensor(prefill + s))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert static.nbytes() == before


@pytest.mark.gpu
@pytest.mark.parametrize("linear_mixer", ["gated_deltanet", "mamba2", "gla", "linear_attention"])
def test_decode_step_captures_in_a_cuda_graph(linear_mixer):
    model = tiny_lm(linear_mixer=linear_mixer).cuda()
    B = 2
    ids = torch.randint(0, 256, (B, 40), device="cuda")
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :20], cache=cache)
        reference = model.new_cache()
        model(ids[:, :20], cache=reference)
        static = StaticCache.from_cache(model, cache, B)
        token = ids[:, 20].clone()
        pos = torch.full((3, B, 1), 20, device="cuda")
        index = torch.tensor(20, device="cuda")
        for _ in range(2):  # warm up (compilation, autotuning, packing) before capturing
            decode_step(model, StaticCache.from_cache(model, reference, B), token, pos, index)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode_step(model, static, token, pos, index)
        for s in range(20, 40):
            token.copy_(ids[:, s])
            pos.fill_(s)
            index.fill_(s)
            graph.replay()
            expected = model(ids[:, s:s + 1], position_ids=torch.full((3, B, 1), s, device="cuda"),
                             cache=reference)[:, 0]
            torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_compiled_decode_step_at_4b_layer_shapes_in_bf16():
    """The packed, compiled step at the real layer widths (kernel tiling, split-K products, fla's recurrent op) in
    bf16, held to the accuracy of the modules' bf16 cached forward: both against the float32 forward. (Two bf16
    paths that round in a different order part by about 2% after a few steps of this random model, so comparing
    them with each other says little.)"""
    import copy

    from ivl.model.config import HybridConfig
    from ivl.model.lm import HybridLM
    torch.manual_seed(0)
    config = HybridConfig.preset("infinitevl-4b", num_layers=4, vocab_size=1024, window=64)
    reference = HybridLM(config).cuda().eval()
    model = copy.deepcopy(reference).to(torch.bfloat16)
    B, prefill, steps = 2, 100, 16
    ids = torch.randint(0, 1024, (B, prefill + steps), device="cuda")
    with torch.no_grad():
        cache, ref_cache = model.new_cache(), reference.new_cache()
        model(ids[:, :prefill], cache=cache)
        reference(ids[:, :prefill], cache=ref_cache)
        static = StaticCache.from_cache(model, cache, B)
        for s in range(prefill, prefill + steps):
            pos = torch.full((3, B, 1), s, device="cuda")
            exact = reference(ids[:, s:s + 1], position_ids=pos, cache=ref_cache)[:, 0]
            modules = model(ids[:, s:s + 1], position_ids=pos, cache=cache)[:, 0].float()
            got = decode_step(model, static, ids[:, s], pos, torch.tensor(s, device="cuda")).float()
            err, module_err = ((t - exact).norm() / exact.norm() for t in (got, modules))
            assert err < max(1.5 * module_err, 1e-2), (s, err.item(), module_err.item())
