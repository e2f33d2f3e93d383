"""The CPython documentation corpus: chunks that give back the text, a split with no topic on both sides, records
the corpus reader takes, docstrings read without importing anything."""

import json
from pydoc_data.topics import topics

import pytest

from ivl.data.corpus import to_sample
from ivl.data.python_docs import build, chunks, docstring_topics
from ivl.errors import UsageError


def test_chunks_respect_the_limit_and_give_back_the_paragraphs():
    text = "\n\n".join(["a" * 30, "b" * 50, "c\n" * 40 + "c", "d" * 250, "e"])
    pieces = chunks(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")
    assert chunks(text, 10_000) == [text]


def test_split_by_topic_and_records_readable(tmp_path):
    stats = build(tmp_path, max_chars=1_000_000, held_out_fraction=0.2, docstrings=False)
    records = {
        split: [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "val")
    }
    train_topics = {r["topic"] for r in records["train"]}
    val_topics = {r["topic"] for r in records["val"]}
    assert train_topics and val_topics and not train_topics & val_topics
    assert len(train_topics | val_topics) == len([t for t in topics.values() if t.strip()])
    for split, rows in records.items():
        assert stats[split]["records"] == len(rows)
        for i, r in enumerate(rows):  # one chunk per topic at this limit: the answer is the topic's text
            assert r["conversations"][1]["value"] == topics[r["topic"].split("/", 1)[1]].strip()
            sample = to_sample(r, f"{split}.jsonl:{i + 1}", tmp_path)
            assert [m["role"] for m in sample.messages] == ["user", "assistant"]


def test_a_split_left_empty_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="split is empty"):
        build(tmp_path, held_out_fraction=0.9999999, docstrings=False)
    with pytest.raises(UsageError, match="between 0 and 1"):
        build(tmp_path, held_out_fraction=0.0, docstrings=False)


def test_docstrings_are_read_from_sources_without_importing_them(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The package docstring, long enough to be kept here."""\n')
    (tmp_path / "boom.py").write_text(
        '"""Importing this module would raise, so it is read, not imported."""\n'
        'raise SystemExit(1)\n\ndef f():\n    """f returns nothing, and says so at length."""\n'
    )
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text('"""A test module that must be left out of the corpus."""\n')
    got = docstring_topics(tmp_path)
    assert set(got) == {"stdlib/pkg", "stdlib/boom"}
    assert "boom.f\n\nf returns nothing" in got["stdlib/boom"]
