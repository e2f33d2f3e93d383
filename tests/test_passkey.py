"""Passkey records: the key once in the prompt and as the answer, at the requested token distance before the
question (measured with the tokenizer on the whole prompt), one task per distance."""

import json

from transformers import AutoTokenizer

from ivl.data.corpus import to_sample
from ivl.data.passkey import QUESTION, build
from ivl.data.processing import bundled_tokenizer_dir


def test_passkey_records_put_the_key_at_the_requested_distance(tmp_path):
    build(tmp_path, str(bundled_tokenizer_dir()), window=32, train=10, per_distance=6, ratios=(0.5, 2.0, 8.0))
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["passkey/0.5x"] * 6 + ["passkey/2x"] * 6 + ["passkey/8x"] * 6
    for i, r in enumerate(rows):
        prompt, key = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert len(key) == 5 and key.isdigit() and prompt.count(key) == 1
        between = prompt.split(f"{key}. Remember it. ", 1)[1].removesuffix(QUESTION)
        wanted = int(float(r["task"].split("/")[1].rstrip("x")) * 32)
        measured = len(tokenizer(between, add_special_tokens=False)["input_ids"])
        assert wanted <= measured <= wanted + 4, (wanted, measured)
        to_sample(r, f"val.jsonl:{i + 1}", tmp_path)  # a record the corpus reader takes
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(train) == 10 and all(0 <= r["distance"] <= 8 * 32 + 4 for r in train)
    again = tmp_path / "again"
    build(again, str(bundled_tokenizer_dir()), window=32, train=10, per_distance=6, ratios=(0.5, 2.0, 8.0))
    assert (again / "val.jsonl").read_text() == (tmp_path / "val.jsonl").read_text()  # seeded
