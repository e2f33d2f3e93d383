"""From per-question records to a benchmark's scores, as VLMEvalKit reports them.

- Circular multiple choice: a question counts once, right only if every one of its copies is (copies are the rows
  ``index + k x 1,000,000`` of a file that holds them, or the rotations asked for a file that does not); a question
  whose first copy is missing is not scored.
- ``mean`` (VLMEvalKit's ``report_acc`` and VQA summary): overall, per ``split``, per ``category`` and per
  ``l2-category``, within each split too; the headline is the ``headline_split``'s score where there is one.
- ``mme``: per category, accuracy + accuracy+ (both questions of an image right), x 100; perception (10 categories,
  at most 2000) and reasoning (4, at most 800); the headline is their sum.
- ``pope``: F1 of "Yes" (categories split at commas), with accuracy, precision and recall.
- ``hallusion``: aAcc (questions), fAcc (figures), qAcc (questions across figures); the headline is their mean, as the
  OpenCompass leaderboard shows it.
- ``ocrbench``: hits, summed into Text Recognition (six categories) and four more, out of the questions (1,000).

Scores are fractions (0-1) except the MME rating (points) and OCRBench's final score (hits).
"""

from __future__ import annotations

from collections import defaultdict

from ivl.evaluate.benchmarks import Benchmark
from ivl.evaluate.tsv import Item

COPY = 1_000_000
MME_PERCEPTION = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
]
MME_REASONING = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
OCRBENCH_TEXT = [
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
]
OCRBENCH_OTHERS = [
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def copy_group(index: str) -> str | None:
    """The question a circular copy belongs to (VLMEvalKit's ``g_index``), or None for a non-integer index."""
    return str(int(index) % COPY) if index.lstrip("-").isdigit() else None


def units(records: list[dict], items: list[Item], circular: str | None) -> list[tuple[Item, float]]:
    """(question, score) per scored question: one per row; or, ``circular`` "copies" or "rotations", one per
    question, right only if all its copies (rows index + k x 1,000,000) or rotations are."""
    item_by_index = {item.index: item for item in items}
    if circular is None:
        by_key = {(r["index"], r.get("rotation", 0)): r for r in records}
        return [(item, by_key[(item.index, 0)]["score"]) for item in items if (item.index, 0) in by_key]
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        group = copy_group(r["index"]) if circular == "copies" else r["index"]
        groups[group if group is not None else r["index"]].append(r["score"])
    return [
        (item_by_index[g], float(all(s == 1.0 for s in scores))) for g, scores in groups.items() if g in item_by_index
    ]


def summarise(records: list[dict], items: list[Item], benchmark: Benchmark, circular: str | None = None) -> dict:
    """Scores of a benchmark from its records; ``circular``: None, "copies" (in the file) or "rotations"."""
    scored = units(records, items, circular)
    result = {
        "items": len(scored),
        "rows": len(records),
        "circular": circular is not None,
        "unreadable": sum(r.get("readable") is False for r in records),
    }
    result.update(_breakdown(scored))
    result["score"] = result["overall"]
    headline = ("accuracy", result["overall"], "fraction")
    if benchmark.headline_split and benchmark.headline_split in result["splits"]:
        headline = (
            f"{benchmark.headline_split} split",
            result["splits"][benchmark.headline_split]["overall"],
            "fraction",
        )
    if benchmark.aggregate == "mme":
        result["mme"] = mme_rating(scored)
        headline = (
            "perception + reasoning (of 2800)",
            result["mme"]["perception"] + result["mme"]["reasoning"],
            "points",
        )
    elif benchmark.aggregate == "pope":
        result["pope"] = pope_rating(records, items)
        headline = ("F1", result["pope"]["Overall"]["f1"], "fraction")
    elif benchmark.aggregate == "hallusion":
        result["hallusion"] = hallusion_rating(scored)
        h = result["hallusion"]
        headline = ("mean of aAcc, fAcc, qAcc", (h["aAcc"] + h["fAcc"] + h["qAcc"]) / 3, "fraction")
    elif benchmark.aggregate == "ocrbench":
        result["ocrbench"] = ocrbench_rating(scored)
        headline = (f"final score (of {len(scored)})", result["ocrbench"]["Final Score"], "points")
    result["headline"] = dict(zip(("name", "value", "unit"), headline))
    return result


def _breakdown(scored: list[tuple[Item, float]]) -> dict:
    def by(key, rows):
        grouped = defaultdict(list)
        for item, score in rows:
            if key(item):
                grouped[key(item)].append(score)
        return {k: _mean(v) for k, v in sorted(grouped.items())}

    splits = {}
    for split in sorted({item.split for item, _ in scored if item.split}):
        rows = [(item, s) for item, s in scored if item.split == split]
        splits[split] = {
            "overall": _mean(s for _, s in rows),
            "categories": by(lambda i: i.category, rows),
            "l2_categories": by(lambda i: i.l2_category, rows),
        }
    return {
        "overall": _mean(s for _, s in scored),
        "splits": splits,
        "categories": by(lambda i: i.category, scored),
        "l2_categories": by(lambda i: i.l2_category, scored),
    }


def mme_rating(scored: list[tuple[Item, float]]) -> dict:
    """Per category: 100 x (accuracy + accuracy+), accuracy+ over the images whose first two questions are both
    right; perception and reasoning are the sums of their categories (a missing one counts 0 and is listed)."""
    by_category: dict[str, list[tuple[Item, float]]] = defaultdict(list)
    for item, score in scored:
        by_category[item.category].append((item, score))
    categories = {}
    for category, rows in by_category.items():
        images: dict[str, list[float]] = defaultdict(list)
        for item, score in rows:
            images[item.row.get("image_path") or item.index].append(score)
        plus = _mean(s[0] * s[1] if len(s) > 1 else 0.0 for s in images.values())
        categories[category] = 100 * (_mean(s for _, s in rows) + plus)
    return {
        "perception": sum(categories.get(c, 0.0) for c in MME_PERCEPTION),
        "reasoning": sum(categories.get(c, 0.0) for c in MME_REASONING),
        "missing": [c for c in MME_PERCEPTION + MME_REASONING if c not in categories],
        "categories": categories,
    }


def pope_rating(records: list[dict], items: list[Item]) -> dict:
    """F1, accuracy, precision and recall of answering "Yes", overall and per category; a row of several
    categories ("random,popular") counts in each, and in Overall once per category, as in VLMEvalKit."""
    item_by_index = {item.index: item for item in items}
    rows = []
    for r in records:
        item = item_by_index[r["index"]]
        for category in item.category.split(",") if item.category else [""]:
            rows.append((category, item.answers[0] == "Yes", r["extracted"] == "Yes", r["score"]))

    def rate(subset):
        tp = sum(t and p for _, t, p, _ in subset)
        fp = sum(p and not t for _, t, p, _ in subset)
        fn = sum(t and not p for _, t, p, _ in subset)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": f1, "accuracy": _mean(s for *_, s in subset), "precision": precision, "recall": recall}

    result = {"Overall": rate(rows)}
    for category in sorted({c for c, *_ in rows if c}):
        result[category] = rate([r for r in rows if r[0] == category])
    return result


def hallusion_rating(scored: list[tuple[Item, float]]) -> dict:
    """aAcc over questions; fAcc over figures (l2-category, set, figure: every question right); qAcc over
    questions asked of several figures (l2-category, set, question). The index is ``..._set_figure_question``."""

    def grouped(parts: tuple[int, int]) -> float:
        groups: dict[tuple, list[float]] = defaultdict(list)
        for item, score in scored:
            fields = item.index.split("_")
            key = (item.l2_category,) + tuple(fields[p] if len(fields) > p else "" for p in parts)
            groups[key].append(score)
        return _mean(float(all(s == 1.0 for s in g)) for g in groups.values())

    return {"aAcc": _mean(s for _, s in scored), "fAcc": grouped((3, 4)), "qAcc": grouped((3, 5))}


def ocrbench_rating(scored: list[tuple[Item, float]]) -> dict:
    hits: dict[str, float] = defaultdict(float)
    for item, score in scored:
        hits[item.category] += score
    result = {"Text Recognition": sum(hits[c] for c in OCRBENCH_TEXT)}
    result.update({c: hits[c] for c in OCRBENCH_OTHERS})
    result["Final Score"] = sum(result.values())
    unknown = sorted(set(hits) - set(OCRBENCH_TEXT) - set(OCRBENCH_OTHERS))
    if unknown:
        result["uncounted categories"] = unknown
    return result
