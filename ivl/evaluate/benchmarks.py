"""Which prompt, answer reading, metric and aggregate a benchmark gets, picked from its file name as VLMEvalKit picks
them from the dataset name (``MMBench_DEV_EN.tsv`` is MMBench, circular; ``DocVQA_VAL.tsv`` is ANLS; ...).

Unknown names fall back to ``auto``: multiple choice when the file has options, VQA soft accuracy when references are
lists, else exact match. An explicit ``--metric`` wins over the name for the per-question score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ivl.evaluate.tsv import Item


@dataclass(frozen=True)
class Benchmark:
    name: str
    prompt: str  # "mcq": hint, question, options, instruction; "vqa": + one word or phrase; "plain"; "mmmu"
    metric: str  # per question: one of ivl.evaluate.scoring.METRICS
    aggregate: str = "mean"  # "mean", "mme", "pope", "hallusion", "ocrbench"
    circular: bool = False  # the file holds each question's rotated copies (index + k x 1,000,000)
    headline_split: str | None = None  # the split whose score is the benchmark's number (MMMU: validation)
    reduce: str = "max"  # several references, exact match: "max" (OCRVQA) or "mean" (GQA)
    note: str = ""  # what a reader of the score must know


MCQ = dict(prompt="mcq", metric="mcq")
VQA = dict(prompt="vqa")
# (pattern on the lower-cased file name, benchmark): VLMEvalKit's dataset names; the first match wins
REGISTRY = [
    (r"mmbench", Benchmark("MMBench", **MCQ, circular=True)),
    (r"ccbench", Benchmark("CCBench", **MCQ, circular=True)),
    (r"circular", Benchmark("circular", **MCQ, circular=True)),
    (r"mmstar", Benchmark("MMStar", **MCQ)),
    (r"seedbench", Benchmark("SEED-Bench", **MCQ)),
    (r"scienceqa", Benchmark("ScienceQA", **MCQ)),
    (r"ai2d", Benchmark("AI2D", **MCQ)),
    (r"realworldqa", Benchmark("RealWorldQA", **MCQ)),
    (
        r"mmmu",
        Benchmark(
            "MMMU",
            prompt="mmmu",
            metric="mcq",
            headline_split="validation",
            note="open questions scored as VLMEvalKit does without a judge: the answer's text in the output",
        ),
    ),
    (r"^mme(?![a-z0-9-])", Benchmark("MME", prompt="plain", metric="yes_no", aggregate="mme")),
    (r"pope", Benchmark("POPE", prompt="plain", metric="yes_no", aggregate="pope")),
    (r"hallusion", Benchmark("HallusionBench", prompt="plain", metric="yes_no", aggregate="hallusion")),
    (r"textvqa", Benchmark("TextVQA", **VQA, metric="vqa")),
    (r"docvqa", Benchmark("DocVQA", **VQA, metric="anls")),
    (r"infovqa", Benchmark("InfoVQA", **VQA, metric="anls")),
    (r"chartqa", Benchmark("ChartQA", **VQA, metric="relaxed")),
    (r"ocrvqa", Benchmark("OCRVQA", **VQA, metric="exact")),
    (r"gqa", Benchmark("GQA", **VQA, metric="exact", reduce="mean")),
    (r"ocrbench", Benchmark("OCRBench", prompt="plain", metric="ocrbench", aggregate="ocrbench")),
    (
        r"mathvista",
        Benchmark(
            "MathVista",
            prompt="plain",
            metric="mathvista",
            note="exact-match part only: the official MathVista score needs a judge model",
        ),
    ),
]


def benchmark_for(name: str, items: list[Item], metric: str = "auto") -> Benchmark:
    """The benchmark a file of this name (its stem) is, with ``metric`` (unless ``auto``) as its per-question
    score."""
    found = next((b for pattern, b in REGISTRY if re.search(pattern, name.lower())), None)
    if found is None:
        auto = (
            "mcq"
            if any(item.multiple_choice for item in items)
            else ("vqa" if any(item.answers and len(item.answers) > 1 for item in items) else "exact")
        )
        found = Benchmark("auto", prompt="mcq" if auto == "mcq" else "vqa", metric=auto)
    if metric != "auto" and metric != found.metric:
        found = Benchmark(
            found.name,
            found.prompt,
            metric,
            "mean",
            found.circular and metric == "mcq",
            found.headline_split,
            found.reduce,
        )
    return found
