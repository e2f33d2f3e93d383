"""Fixed-shape decoding (the CUDA-graph path) against the dynamic cache it replaces."""

import pytest
import torch
from test_hybrid_lm import tiny_lm

from ivl.model.decoding.static_cache import StaticCache, decode_step
from ivl.model.mixers import LINEAR_MIXERS


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


def test_pool_slots_are_streams_of_their_own_loaded_without_their_padding_and_moved_whole():
    """A row prefilled left-padded in a batch, loaded into a slot of a used pool with its padding left out, decodes
    (crossing the window, 16) as the same prompt prefilled alone in a fresh cache; moved to another slot, it goes on
    decoding the same; the slot beside it, another stream at another token index, is untouched."""
    torch.manual_seed(0)
    model = tiny_lm()
    prompt, other, steps = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 30)), torch.randint(0, 256, (24,))

    def prefilled(ids, pad=0):
        cache = model.new_cache()
        mask = torch.ones(1, pad + ids.shape[1], dtype=torch.long)
        mask[:, :pad] = 0
        ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
        model(ids, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), attention_mask=mask if pad else None, cache=cache)
        return cache

    def step(static, tokens, positions, indices):
        return decode_step(
            model,
            static,
            torch.tensor(tokens),
            torch.tensor(positions)[None, :, None].expand(3, -1, 1),
            torch.tensor(indices),
        )

    with torch.no_grad():
        alone = StaticCache.from_cache(model, prefilled(prompt))
        expected = [step(alone, [int(t)], [9 + s], [9 + s])[0] for s, t in enumerate(steps)]
        pool = StaticCache(model, 3)
        pool.load(0, prefilled(other))
        for s in range(5):  # the pool served another stream first: its slot 1 is not empty
            pool.load(1, prefilled(other))
            step(pool.rows(2), [1, 2], [30 + s, 30 + s], [30 + s, 30 + s])
        pool.load(1, prefilled(prompt, pad=4), shift=4)
        got = []
        for s, t in enumerate(steps):
            if s == 10:
                pool.move_row(1, 2)  # as when a row before it leaves
            row = 1 if s < 10 else 2
            tokens, positions, indices = [7, 7, 7], [35 + s] * 3, [35 + s] * 3
            tokens[row], positions[row], indices[row] = int(t), 9 + s, 9 + s
            got.append(step(pool, tokens, positions, indices)[row])
        torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("linear_mixer", LINEAR_MIXERS)
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
            expected = model(ids[:, s : s + 1], position_ids=torch.full((3, B, 1), s, device="cuda"), cache=reference)[
                :, 0
            ]
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
            exact = reference(ids[:, s : s + 1], position_ids=pos, cache=ref_cache)[:, 0]
            modules = model(ids[:, s : s + 1], position_ids=pos, cache=cache)[:, 0].float()
            got = decode_step(model, static, ids[:, s], pos, torch.tensor(s, device="cuda")).float()
            err, module_err = ((t - exact).norm() / exact.norm() for t in (got, modules))
            assert err < max(1.5 * module_err, 1e-2), (s, err.item(), module_err.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_slot_decoders_serve_batch_after_batch_as_the_dynamic_cache_decodes():
    """The engine's scheme on the GPU: a pool of slots and one graph per power-of-two bucket, refilled for each
    batch (3 rows in a bucket of 4, then 3 and 2 other rows of other lengths, left padding and placeholders
    included), replaying the logits of the dynamic cache's cached forward."""
    from ivl.model.decoding.generation import SlotDecoder

    torch.manual_seed(0)
    model = tiny_lm().cuda()
    slots = SlotDecoder(model, 8, cuda_graph=True)
    with torch.no_grad():
        for rows, length, pad in ((3, 30, 0), (3, 9, 4), (2, 17, 5)):
            ids = torch.randint(0, 256, (rows, length + 8), device="cuda")
            mask = torch.ones(rows, length, dtype=torch.long, device="cuda")
            mask[0, :pad] = 0
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache, reference = model.new_cache(), model.new_cache()
            model(ids[:, :length], position_ids=positions, attention_mask=mask, cache=cache)
            model(ids[:, :length], position_ids=positions, attention_mask=mask, cache=reference)
            shifts = [pad] + [0] * (rows - 1)
            for r in range(rows):
                slots.pool.load(r, cache.select_rows(torch.tensor([r], device="cuda")), shifts[r])
            for s in range(8):
                got = slots(
                    ids[:, length + s].tolist(),
                    (positions[:, -1] + 1 + s).tolist(),
                    [length + s - shifts[r] for r in range(rows)],
                )
                expected = model(
                    ids[:, length + s : length + s + 1],
                    cache=reference,
                    position_ids=(positions[:, -1:] + 1 + s)[None].expand(3, -1, 1),
                )[:, 0]
                torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert sorted(slots.graphs) == [2, 4]
