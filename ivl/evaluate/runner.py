"""Run one benchmark file: batched greedy generation through the constant-memory cache, per-item scores written
as they come (``predictions.jsonl``, so that a killed run resumes where it stopped), then ``scores.json``
(overall and per category), MLflow metrics and a printed table."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ivl.data.corpus import BadSample, Media
from ivl.data.media import load_video
from ivl.evaluate import answers, prompts, scoring
from ivl.evaluate.tsv import Item, read_tsv
from ivl.serve.engine import Engine, Prompt, Sampling


@dataclass
class Options:
    metric: str = "auto"  # auto | mcq | vqa | anls | relaxed | exact
    batch_size: int = 8
    max_new_tokens: int = 32
    limit: int | None = None
    circular: bool = False
    frames: int | None = None  # video benchmarks: frames sampled per video
    media_root: Path | None = None
    skip_bad: bool = False


def metric_for(items: list[Item], requested: str) -> str:
    """``auto``: multiple choice when the file has options, VQA soft accuracy when references are lists, else
    exact match."""
    if requested != "auto":
        return requested
    if any(item.multiple_choice for item in items):
        return "mcq"
    return "vqa" if any(len(item.answers) > 1 for item in items) else "exact"


def evaluate_file(engine: Engine, tsv: Path, out: Path, options: Options) -> dict:
    """Scores of one benchmark file (writes ``out/predictions.jsonl`` and ``out/scores.json``)."""
    items, skipped = read_tsv(tsv, options.media_root, options.skip_bad)
    if options.limit is not None:
        items = items[: options.limit]
    metric = metric_for(items, options.metric)
    if metric not in scoring.METRICS:
        raise ValueError(f"--metric must be auto or one of {scoring.METRICS}; got {metric!r}")
    if metric == "mcq" and not all(item.multiple_choice for item in items):
        bad = next(item for item in items if not item.multiple_choice)
        raise ValueError(f"{tsv}: --metric mcq, but row index {bad.index} has no options")
    jobs = [(item, rotation) for item in items
            for rotation in (range(len(item.options)) if options.circular and metric == "mcq" else [0])]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.jsonl"
    done = {}
    if path.is_file():  # resume: keep what a previous run already scored
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[(record["index"], record.get("rotation", 0))] = record
    todo = [(item, r) for item, r in jobs if (item.index, r) not in done]
    with path.open("a") as f, tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=tsv.stem,
                                    unit="q") as bar:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start:start + options.batch_size]
            texts = _generate(engine, batch, options)
            for (item, rotation), text in zip(batch, texts):
                record = _record(item, rotation, text, metric)
                done[(item.index, rotation)] = record
                f.write(json.dumps(record) + "\n")
            f.flush()
            bar.update(len(batch))
    records = [done[(item.index, r)] for item, r in jobs]
    scores = summarise(records, items, metric, options.circular and metric == "mcq")
    scores.update(benchmark=tsv.stem, file=str(tsv), metric=metric, skipped=len(skipped),
                  skipped_rows=skipped[:50], frames=options.frames)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def _generate(engine: Engine, batch, options: Options) -> list[str]:
    chat = []
    for item, rotation in batch:
        messages, images = prompts.build(item, rotation)
        videos = []
        if item.video is not None:
            try:
                frames, _ = load_video(Media("video", path=str(item.video),
                                            options={"nframes": options.frames} if options.frames else {}),
                                       f"index {item.index}", max_frames=options.frames or 64)
            except BadSample as error:
                raise ValueError(str(error)) from None
            videos.append(frames)
            messages[0]["content"].insert(0, {"type": "video"})
        text = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
        chat.append(Prompt(text, images, videos, Sampling(max_tokens=options.max_new_tokens, temperature=0.0)))
    outputs = [""] * len(chat)
    for step in engine.generate(chat):
        for i, delta in enumerate(step):
            if delta is not None:
                outputs[i] += delta.text
    return outputs


def _record(item: Item, rotation: int, text: str, metric: str) -> dict:
    record = {"index": item.index, "question": item.question, "prediction": text, "category": item.category}
    if metric == "mcq":
        shown = prompts.rotate(item.options, rotation)
        letter = answers.read_choice(text, shown)
        truth = next(k for k, v in shown.items() if v == item.options[item.answers[0]])
        record.update(rotation=rotation, extracted=letter, reference=truth, readable=letter is not None,
                      score=float(letter == truth))
    else:
        extracted = answers.read_open(text)
        record.update(extracted=extracted, reference=item.answers, score=scoring.score(metric, extracted, item.answers))
    return record


def summarise(records: list[dict], items: list[Item], metric: str, circular: bool) -> dict:
    """Overall and per-category mean score (circular: a question counts only if every rotation is right)."""
    per_item: dict[str, list[float]] = defaultdict(list)
    unreadable = 0
    for record in records:
        per_item[record["index"]].append(record["score"])
        unreadable += record.get("readable") is False
    item_score = {index: (float(all(s == 1.0 for s in s_list)) if circular else s_list[0])
                  for index, s_list in per_item.items()}
    by_category: dict[str, list[float]] = defaultdict(list)
    for item in items:
        if item.index in item_score:
            by_category[item.category or "all"].append(item_score[item.index])
    overall = sum(item_score.values()) / max(1, len(item_score))
    return {"score": overall, "items": len(item_score), "unreadable": unreadable, "circular": circular,
            "categories": {c: sum(v) / len(v) for c, v in sorted(by_category.items())}}


def table(results: list[dict]) -> str:
    lines = ["| benchmark | metric | frames | items | score | unreadable | skipped |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['benchmark']} | {r['metric']}{' (circular)' if r['circular'] else ''} | "
                     f"{r['frames'] or ''} | {r['items']} | {100 * r['score']:.1f} | {r['unreadable']} | "
                     f"{r['skipped']} |")
    return "\n".join(lines)


def log_mlflow(results: list[dict], tracking_uri: str | None, experiment: str, run_name: str,
               params: dict) -> str | None:
    """Scores as MLflow metrics ``eval/<benchmark>[/<frames>f]/score`` (and per category), in the active run or a
    new one; returns its id."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.active_run()
    if active is None:
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name)
    else:
        run = active
    try:
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        for r in results:
            key = f"eval/{r['benchmark']}" + (f"/{r['frames']}f" if r["frames"] else "")
            mlflow.log_metric(f"{key}/score", r["score"])
            for category, value in r["categories"].items():
                mlflow.log_metric(f"{key}/{_metric_name(category)}", value)
        return run.info.run_id
    finally:
        if active is None:
            mlflow.end_run()


def _metric_name(category: str) -> str:
    safe = "".join(c if c.isalnum() or c in "_-. /" else "_" for c in category)
    return safe.strip() or "all"
