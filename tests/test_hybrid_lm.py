import pytest
import torch

from ivl.model import HybridConfig, HybridLM
from references import assert_as_accurate, float64


def tiny_lm(**overrides) -> HybridLM:
    model = HybridLM(HybridConfig.tiny(**overrides)).eval()
    # Random (not mimic) GDN gates and convs, so that decay, write strength and convolution all matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("a_proj", "b_proj", "conv1d", "A_log", "dt_bias")):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
def test_chunked_prefill_then_decode_equals_full_forward(chunk):
    model = tiny_lm()
    window = model.config.window
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * window + 5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        prefill = 2 * window + 3  # crosses the window boundary during prefill and during decoding
        pieces = [model(ids[:, a : min(a + chunk, prefill)], cache=cache) for a in range(0, prefill, chunk)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
        exact = float64(model)(ids)
    assert_as_accurate(torch.cat(pieces, dim=1), full, exact)


def test_cache_memory_is_constant_past_the_window():
    model = tiny_lm()
    window = model.config.window
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, window)), cache=cache)
        after_one_window = cache.nbytes()
        for _ in range(2 * window):
            model(torch.randint(0, 256, (1, 1)), cache=cache)
    assert after_one_window > 0
    assert cache.nbytes() == after_one_window


def test_full_attention_cache_grows():
    """The control for the test above: without a window the attention cache must grow with the input."""
    model = tiny_lm(window=None)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 16)), cache=cache)
        first = cache.nbytes()
        model(torch.randint(0, 256, (1, 16)), cache=cache)
    assert cache.nbytes() > first


def test_packed_batch_equals_separate_sequences():
    model = tiny_lm()
    lengths = [9, 30, 1, 21]
    seqs = [torch.randint(0, 256, (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs, dim=1), cu_seqlens=cu)
        separate = torch.cat([model(s) for s in seqs], dim=1)
        exact = torch.cat([float64(model)(s) for s in seqs], dim=1)
    assert_as_accurate(packed, separate, exact)


def test_window_limits_what_attention_sees():
    """With attention only, a token beyond the window cannot influence the output; within it, it does."""
    model = tiny_lm(layer_types=["attention"] * 2, num_layers=2, window=4)
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # two attention layers with window 4 reach 2 * 3 = 6 tokens back
    assert torch.allclose(a[0, 7:], b[0, 7:])
    assert not torch.allclose(a[0, 6], b[0, 6])


def test_gradients_flow_to_every_parameter():
    model = tiny_lm().train()
    model(torch.randint(0, 256, (2, 20))).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_tied_embeddings():
    model = HybridLM(HybridConfig.tiny())
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = HybridLM(HybridConfig.tiny(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


@pytest.mark.parametrize("chunk", [None, 5])
def test_left_padded_batch_equals_unpadded_rows(chunk):
    """Padding tokens are invisible: each row of a left-padded batch gives the logits of its prompt alone."""
    model = tiny_lm()
    window = model.config.window
    lengths = [2 * window + 3, window - 4]
    T = max(lengths)
    rows = [torch.randint(0, 256, (1, n)) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, T - row.shape[1]:] = row
        mask[b, T - row.shape[1]:] = 1
        positions[b, T - row.shape[1]:] = torch.arange(row.shape[1])
    with torch.no_grad():
        if chunk is None:
            batched = model(ids, position_ids=positions, attention_mask=mask)
        else:
            cache = model.new_cache()
            batched = torch.cat([model(ids[:, a:a + chunk], position_ids=positions[:, a:a + chunk],
                                       attention_mask=mask[:, a:a + chunk], cache=cache)
                                 for a in range(0, T, chunk)], dim=1)
        exact_model = float64(model)
        for b, row in enumerate(rows):
            alone = model(row)
            assert_as_accurate(batched[b, T - row.shape[1]:], alone[0], exact_model(row)[0])
