"""Token counts from headers equal the lengths of the encoded samples, so packs planned from them are exact."""

import json

import numpy as np
import pytest

from ivl.data import CorpusSpec, read_corpus
from ivl.data.corpus import BadSample
from ivl.data.demo import build
from ivl.data.encoding import SampleEncoder
from ivl.data.lengths import cache_key, cached_lengths, sample_lengths
from ivl.data.packing import plan_packs
from ivl.data.processing import Processor


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build(out, seed=1, scale=0.02)
    return out


def encoded_length(encoder, sample):
    try:
        return len(encoder(sample)["input_ids"])
    except BadSample:
        return 0


@pytest.mark.parametrize("subset", ["images", "documents", "videos"])
@pytest.mark.parametrize("max_tokens, truncation", [(8192, "error"), (40, "truncate"), (40, "error")])
def test_header_counts_equal_encoded_lengths(demo, subset, max_tokens, truncation):
    processor = Processor(
        Processor.from_pretrained().tokenizer,
        image_max_pixels=28 * 28 * 9,
        video_min_pixels=3136,
        video_max_pixels=3136,
    )
    encoder = SampleEncoder(processor, max_tokens=max_tokens, truncation=truncation, video_max_frames=8)
    samples = read_corpus(CorpusSpec(str(demo / subset / "train.jsonl")))
    assert sample_lengths(samples, encoder) == [encoded_length(encoder, s) for s in samples]


def test_the_cached_plan_is_the_encode_everything_plan(demo, tmp_path):
    processor = Processor.from_pretrained()
    encoder = SampleEncoder(processor, video_max_frames=8)
    files = [demo / "images" / "train.jsonl", demo / "documents" / "train.jsonl"]
    samples = [s for f in files for s in read_corpus(CorpusSpec(str(f)))]
    encoded = [encoded_length(encoder, s) for s in samples]
    first = cached_lengths(samples, encoder, files, {})
    cache = next((demo / "images" / ".ivl-cache").glob("lengths-*.json"))
    assert json.loads(cache.read_text()) == first == encoded
    order = list(np.random.default_rng(0).permutation(len(samples)))
    assert plan_packs(first, order, 1024) == plan_packs(encoded, order, 1024)
    cache.write_text(json.dumps([7] * len(samples)))  # a second setup reads the cache, not the media
    assert cached_lengths(samples, encoder, files, {}) == [7] * len(samples)
    changed = SampleEncoder(Processor.from_pretrained(image_max_pixels=28 * 28 * 4), video_max_frames=8)
    assert cache_key(files, changed, {}) != cache_key(files, encoder, {})  # other settings, other counts


def _count_on_rank(rank, world, init, corpus, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        encoder = SampleEncoder(Processor.from_pretrained(), video_max_frames=8)
        samples = read_corpus(CorpusSpec(str(corpus)))
        lengths = cached_lengths(samples, encoder, [corpus], {"world": world})
        (out / f"rank{rank}.json").write_text(json.dumps(lengths))
    finally:
        dist.destroy_process_group()


def test_two_processes_count_a_share_each_and_agree(demo, tmp_path):
    """Under torch.distributed (gloo, two CPU processes) every rank ends with every sample's count."""
    import torch.multiprocessing as mp

    corpus = demo / "documents" / "train.jsonl"
    mp.spawn(_count_on_rank, args=(2, f"file://{tmp_path / 'init'}", corpus, tmp_path), nprocs=2)
    encoder = SampleEncoder(Processor.from_pretrained(), video_max_frames=8)
    expected = [encoded_length(encoder, s) for s in read_corpus(CorpusSpec(str(corpus)))]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [expected, expected]
