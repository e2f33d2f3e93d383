import pytest
import torch
from test_hybrid_lm import tiny_lm

from ivl.model.decoding.prefill_graph import PrefillGraphs
from ivl.model.mixers import LINEAR_MIXERS


def _text_positions(a: int, B: int, T: int, device) -> torch.Tensor:
    return torch.arange(a, a + T, device=device).expand(3, B, -1)


def test_token_indices_given_as_a_tensor_are_the_ones_the_cache_would_count():
    model = tiny_lm().eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        counted, given = model.new_cache(), model.new_cache()
        model.hidden_states(ids[:, :24], cache=counted)
        model.hidden_states(ids[:, :24], cache=given, token_index=torch.arange(24))
        shifted = given.clone()
        expected = model.hidden_states(ids[:, 24:], cache=counted)
        got = model.hidden_states(ids[:, 24:], cache=given, token_index=torch.arange(24, 40))
        # Read, not recomputed: indices 3 further on put the chunk's keys in other ring slots, over other keys.
        other = model.hidden_states(ids[:, 24:], cache=shifted, token_index=torch.arange(27, 43))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(other, expected)


def test_on_a_cpu_every_chunk_runs_eagerly():
    model = tiny_lm().eval()
    graphs = PrefillGraphs(model)
    ids = torch.randint(0, 256, (1, 96))
    with torch.no_grad():
        cache, reference = model.new_cache(), model.new_cache()
        for a in range(0, 96, 32):
            chunk = ids[:, a : a + 32]
            got = graphs(cache, model.embed_tokens(chunk), _text_positions(a, 1, 32, "cpu"))
            torch.testing.assert_close(got, model.hidden_states(chunk, cache=reference), rtol=0, atol=0)
    assert not graphs._graphs and cache.seen_tokens == 96


def _prefill_both_ways(model, B: int, T: int, chunks: int, vocab: int):
    """Hidden states and caches of ``chunks`` chunks prefilled through PrefillGraphs and eagerly."""
    ids = torch.randint(0, vocab, (B, T * chunks), device="cuda")
    graphs = PrefillGraphs(model)
    with torch.no_grad():
        cache, reference = model.new_cache(), model.new_cache()
        pairs = []
        for a in range(0, T * chunks, T):
            chunk = ids[:, a : a + T]
            got = graphs(cache, model.embed_tokens(chunk), _text_positions(a, B, T, "cuda"))
            pairs.append((got, model.hidden_states(chunk, cache=reference)))
    return graphs, cache, reference, pairs


@pytest.mark.gpu
@pytest.mark.parametrize("T", [128, 40])
@pytest.mark.parametrize("linear_mixer", LINEAR_MIXERS)
def test_chunks_over_a_full_window_replay_a_graph_that_continues_the_stream_as_eager_prefill(linear_mixer, T):
    """Chunks over a window of 16: the first fills the rings, the second runs eagerly (compiling), the third is
    captured and replayed, later ones replay; the stream they leave decodes as the eager one. 128 tokens take the
    block-sparse band; 40 (not a multiple of the window, so each chunk writes other ring slots) the masked path."""
    torch.manual_seed(0)
    model = tiny_lm(linear_mixer=linear_mixer).cuda().eval()
    B = 2
    graphs, cache, reference, pairs = _prefill_both_ways(model, B, T, chunks=6, vocab=256)
    assert len(graphs._graphs) == 1 and not graphs._failed
    for got, expected in pairs:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert cache.seen_tokens == reference.seen_tokens == 6 * T
    for entry, ref in zip(cache.layers, reference.layers):
        for t, r in zip(entry.tensors(), ref.tensors()):
            torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        token = torch.randint(0, 256, (B, 1), device="cuda")
        pos = torch.full((3, B, 1), 6 * T, device="cuda")
        torch.testing.assert_close(
            model(token, position_ids=pos, cache=cache), model(token, position_ids=pos, cache=reference)
        )


@pytest.mark.gpu
def test_replayed_chunks_at_4b_layer_shapes_in_bf16_equal_eager_ones():
    """The real widths (fla's chunk kernel and FlexAttention's band at head dim 128) in bf16: a replay runs the
    eager chunk's kernels, so it agrees with it to bf16 rounding."""
    from ivl.model.config import HybridConfig
    from ivl.model.lm import HybridLM

    torch.manual_seed(0)
    config = HybridConfig.preset("infinitevl-4b", num_layers=4, vocab_size=1024, window=256)
    model = HybridLM(config).cuda().to(torch.bfloat16).eval()
    graphs, _, _, pairs = _prefill_both_ways(model, 1, 512, chunks=5, vocab=1024)
    assert len(graphs._graphs) == 1
    for got, expected in pairs[2:]:
        err = (got.float() - expected.float()).norm() / expected.float().norm()
        assert err < 1e-2, err.item()
