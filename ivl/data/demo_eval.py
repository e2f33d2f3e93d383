"""Offline sample benchmarks in VLMEvalKit's TSV format, from the demo corpus's held-out (val) split, so that the
whole evaluation path (``python -m ivl.evaluate``) runs on a fresh machine.

- easy-vqa.tsv       easy-vqa's test images, open answer (exact match)
- easy-vqa-mcq.tsv   the same questions as multiple choice: the answer and distractors of the same kind
- digits.tsv         the printed-digit pages, open answer (OCR-style)
- charts.tsv         the stock bar charts, multiple choice between the two tickers
- videos.tsv         the coloured-squares clips (``video`` column, relative to ``<demo>/videos``), open answer

Each row's ``category`` is its demo task, so scores come out per task too. ``prior.json`` holds what the answer
prior scores on each benchmark (the train split's most frequent answer to each question, scored by the same
rules): the bar a trained model has to clear.
"""

from __future__ import annotations

import base64
import csv
import json
import random
from collections import Counter
from pathlib import Path

YES_NO = ["yes", "no"]
SHAPES = ["circle", "rectangle", "triangle"]
COLUMNS = ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
VIDEO_COLUMNS = ["index", "video", "question", "answer", "category"]


def _question(record: dict) -> str:
    text = record["conversations"][0]["value"].split("\n", 1)[1]
    return text.removesuffix(" Answer in one word.")


def _image(folder: Path, record: dict) -> str:
    return base64.b64encode((folder / record["image"]).read_bytes()).decode()


def _write(path: Path, columns: list[str], rows: list[dict]) -> None:
    """As VLMEvalKit's ``dump`` writes a TSV: every field quoted."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)


def _choices(answer: str, kind: list[str], rng: random.Random) -> dict[str, str]:
    distractors = rng.sample([a for a in kind if a != answer], min(3, len(kind) - 1))
    options = [answer] + distractors
    rng.shuffle(options)
    return dict(zip("ABCD", options))


def build_eval(demo: Path, out: Path | None = None, seed: int = 0) -> list[Path]:
    """Write the TSVs under ``out`` (default ``<demo>/eval``) from ``demo``'s val splits; returns their paths."""
    out = out or demo / "eval"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    read = {name: [json.loads(line) for line in (demo / name / "val.jsonl").read_text().splitlines()]
            for name in ("images", "documents", "videos")}
    for name, records in read.items():
        if not records:
            raise ValueError(f"{demo / name / 'val.jsonl'} is empty; rebuild with python -m ivl.data.demo")

    vqa, mcq = [], []
    seen = {json.loads(line)["answer"] for split in ("train", "val")
            for line in (demo / "images" / f"{split}.jsonl").read_text().splitlines()}
    kinds = [YES_NO, SHAPES, sorted(seen - set(YES_NO) - set(SHAPES))]  # easy-vqa: colours are the rest
    for i, record in enumerate(read["images"]):
        question, image = _question(record), _image(demo / "images", record)
        vqa.append({"index": i, "image": image, "question": question, "answer": record["answer"],
                    "category": record["task"]})
        kind = next(k for k in kinds if record["answer"] in k)  # distractors of the same kind
        options = _choices(record["answer"], kind, rng)
        answer = next(k for k, v in options.items() if v == record["answer"])
        mcq.append({"index": i, "image": image, "question": question, **options,
                    "answer": answer, "category": record["task"]})
    digits, charts = [], []
    for i, record in enumerate(read["documents"]):
        question, image = _question(record), _image(demo / "documents", record)
        if record["task"] == "document-digit":
            digits.append({"index": i, "image": image, "question": question, "answer": record["answer"],
                           "category": record["task"]})
        else:
            a, b = question.removeprefix("Which stock is higher, ").removesuffix("?").split(" or ")
            charts.append({"index": i, "image": image, "question": question, "A": a, "B": b,
                           "answer": "A" if record["answer"] == a else "B", "category": record["task"]})
    videos = [{"index": i, "video": record["video"], "question": _question(record), "answer": record["answer"],
               "category": record["task"]} for i, record in enumerate(read["videos"])]
    priors = _priors(demo)
    paths, prior_scores = [], {}
    for name, columns, rows in (("easy-vqa", COLUMNS, vqa), ("easy-vqa-mcq", COLUMNS, mcq),
                                ("digits", COLUMNS, digits), ("charts", COLUMNS, charts),
                                ("videos", VIDEO_COLUMNS, videos)):
        path = out / f"{name}.tsv"
        _write(path, columns, rows)
        paths.append(path)
        prior_scores[name] = _prior_score(rows, priors)
    (out / "prior.json").write_text(json.dumps(prior_scores, indent=2) + "\n")
    return paths


def _priors(demo: Path) -> dict[str, str]:
    """The most frequent train answer to each question text."""
    counts: dict[str, Counter] = {}
    for name in ("images", "documents", "videos"):
        for line in (demo / name / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            counts.setdefault(_question(record), Counter())[record["answer"]] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def _prior_score(rows: list[dict], priors: dict[str, str]) -> float:
    """Mean exact-match score of answering each row with the prior (multiple choice: the option holding the
    prior answer, else A)."""
    right = 0
    for row in rows:
        guess = priors.get(row["question"], "")
        if "A" in row and row.get("A"):
            letters = [k for k in "ABCD" if row.get(k)]
            guess = next((k for k in letters if row[k] == guess), "A")
        right += guess.strip().lower() == row["answer"].strip().lower()
    return right / len(rows)
