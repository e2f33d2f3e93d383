"""The demo corpus: built offline, readable by the DataModules, and its answers true to its media."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivl.data import CorpusSpec, read_corpus
from ivl.data.corpus import Media
from ivl.data.demo import COLORS, build
from ivl.data.media import load_video


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build(out, seed=0, scale=0.02)
    return out


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_subset_reads_cleanly(corpus):
    for subset in ("images", "documents", "videos"):
        for split in ("train", "val"):
            samples = read_corpus(CorpusSpec(str(corpus / subset / f"{split}.jsonl")))
            assert samples and all(Path(m.path).exists() for s in samples for m in s.media)


def test_video_order_answers_match_the_pixels(corpus):
    """Decode each clip and find the first square that appears: its colour must be the recorded answer."""
    checked = 0
    for record in records(corpus / "videos" / "train.jsonl") + records(corpus / "videos" / "val.jsonl"):
        if record["task"] != "video-order":
            continue
        frames, _ = load_video(
            Media("video", path=str(corpus / "videos" / record["video"]), options={"nframes": 8}), "test"
        )
        background = frames[0].astype(int)
        changed = next(f for f in frames if np.abs(f.astype(int) - background).max() > 60).astype(int)
        mask = np.abs(changed - background).max(-1) > 60
        seen = changed[mask].mean(0)
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - seen).sum())
        assert nearest == record["answer"]
        checked += 1
    assert checked > 0


def test_chart_answers_match_the_bars_and_the_real_stock_data(corpus):
    """Measure both bars in each chart image (first stock blue, second orange): the answer is the taller one's
    stock, and some month of matplotlib's Stocks.csv has that stock clearly above the other."""
    from PIL import Image

    from ivl.data.demo import _stock_prices

    tickers, prices = _stock_prices()
    checked = 0
    for record in records(corpus / "documents" / "train.jsonl") + records(corpus / "documents" / "val.jsonl"):
        if record["task"] != "chart-compare":
            continue
        a, b = record["conversations"][0]["value"].split("higher, ")[1].split("?")[0].split(" or ")
        pixels = np.asarray(Image.open(corpus / "documents" / record["image"]).convert("RGB")).astype(int)
        heights = [
            int((np.abs(pixels - colour).sum(-1) < 60).any(1).sum()) for colour in ((48, 96, 208), (208, 96, 48))
        ]
        assert min(heights) > 0
        assert record["answer"] == (a if heights[0] > heights[1] else b), record["image"]
        i, j = tickers.index(record["answer"]), tickers.index(b if record["answer"] == a else a)
        assert any(row[i] > 1.2 * row[j] for row in prices if row[i] == row[i] and row[j] == row[j])
        checked += 1
    assert checked > 0


def test_val_images_come_from_easy_vqa_test_split(corpus):
    assert all("test-" in r["image"] for r in records(corpus / "images" / "val.jsonl"))
    assert all("train-" in r["image"] for r in records(corpus / "images" / "train.jsonl"))


def test_eval_benchmarks_hold_the_val_questions_and_answers(corpus, tmp_path):
    """`python -m ivl.data.demo --eval`: VLMEvalKit TSVs that read back to the val split's questions, media and
    answers (multiple choice: the lettered option holds the recorded answer)."""
    from ivl.data.demo_eval import build_eval
    from ivl.evaluate.tsv import read_tsv

    paths = {p.stem: p for p in build_eval(corpus, tmp_path)}
    val = {name: records(corpus / name / "val.jsonl") for name in ("images", "documents", "videos")}
    open_items, _ = read_tsv(paths["easy-vqa"])
    mcq_items, _ = read_tsv(paths["easy-vqa-mcq"])
    assert [i.answers[0] for i in open_items] == [r["answer"] for r in val["images"]]
    assert [i.options[i.answers[0]] for i in mcq_items] == [r["answer"] for r in val["images"]]
    first = np.asarray(open_items[0].images[0])
    assert np.array_equal(first, np.asarray(Image.open(corpus / "images" / val["images"][0]["image"]).convert("RGB")))
    charts, _ = read_tsv(paths["charts"])
    chart_records = [r for r in val["documents"] if r["task"] == "chart-compare"]
    assert [c.options[c.answers[0]] for c in charts] == [r["answer"] for r in chart_records]
    videos, _ = read_tsv(paths["videos"], media_root=corpus / "videos")
    assert [v.answers[0] for v in videos] == [r["answer"] for r in val["videos"]] and videos[0].video.is_file()
    prior = json.loads((tmp_path / "prior.json").read_text())
    assert set(prior) == set(paths) and all(0.0 <= s <= 1.0 for s in prior.values())
