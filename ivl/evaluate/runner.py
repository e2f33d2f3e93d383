"""Run one benchmark file: batched greedy generation through the constant-memory cache, per-question records
written as they come (``predictions.jsonl``, so that a killed run resumes where it stopped), then ``scores.json``
and VLMEvalKit's own prediction file (``predictions.tsv``: the benchmark's columns but the image, and
``prediction``), MLflow metrics and a printed table.

A folder resumes only the run that started it: ``fingerprint.json`` beside the records names the model, the file,
the benchmark's prompt, reading and metric, and the options, and a run with other ones is refused.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ivl.data.corpus import BadSample, Media
from ivl.data.media import load_video
from ivl.errors import UsageError
from ivl.evaluate import answers, prompts, scoring
from ivl.evaluate.benchmarks import Benchmark, benchmark_for
from ivl.evaluate.report import COPY, copy_group, summarise
from ivl.evaluate.tsv import Item, read_tsv
from ivl.serve.engine import ChatEngine, Prompt, Sampling

PROMPTS_VERSION = "vlmevalkit-2026-06"  # changes whenever prompts or answer reading change: old records go stale


@dataclass
class Options:
    metric: str = "auto"  # auto | one of scoring.METRICS
    batch_size: int = 8
    max_new_tokens: int = 32
    limit: int | None = None
    circular: bool = False  # multiple choice without copies in the file: ask every rotation
    frames: int | None = None  # video benchmarks: frames sampled per video
    media_root: Path | None = None
    skip_bad: bool = False


@dataclass
class Plan:
    """What a run asks: the questions, as (item, rotation) jobs, and how they are scored."""

    name: str
    items: list[Item]
    skipped: list[str]
    benchmark: Benchmark
    circular: str | None  # None, "copies" (in the file) or "rotations" (asked here)
    jobs: list[tuple[Item, int]]

    @property
    def scored(self) -> bool:
        return all(item.answers is not None for item in self.items)


def plan(tsv: Path, options: Options) -> Plan:
    items, skipped = read_tsv(tsv, options.media_root, options.skip_bad)
    benchmark = benchmark_for(tsv.stem, items, options.metric)
    if benchmark.metric not in scoring.METRICS:
        raise UsageError(f"--metric must be auto or one of {scoring.METRICS}; got {benchmark.metric!r}")
    if benchmark.metric == "mcq" and benchmark.prompt != "mmmu" and not all(i.multiple_choice for i in items):
        bad = next(item for item in items if not item.multiple_choice)
        raise UsageError(f"{tsv}: multiple choice, but row index {bad.index} has no options")
    indices = {item.index for item in items}
    copies = benchmark.metric == "mcq" and any(
        copy_group(i) is not None and int(i) >= COPY and copy_group(i) in indices for i in indices
    )
    circular = "copies" if copies else "rotations" if options.circular and benchmark.metric == "mcq" else None
    if options.limit is not None:
        if copies:  # the first questions with all their copies
            first = list(dict.fromkeys(copy_group(item.index) for item in items))[: options.limit]
            items = [item for item in items if copy_group(item.index) in set(first)]
        else:
            items = items[: options.limit]
    jobs = [
        (item, r)
        for item in items
        for r in (range(len(item.options)) if circular == "rotations" and item.options else [0])
    ]
    return Plan(tsv.stem, items, skipped, benchmark, circular, jobs)


def fingerprint(plan: Plan, tsv: Path, options: Options, model: str) -> dict:
    """What records are valid for: written beside them, compared when a run resumes."""
    stat = tsv.stat()
    return {
        "model": model,
        "file": f"{tsv.resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns})",
        "prompts": PROMPTS_VERSION,
        "benchmark": asdict(plan.benchmark),
        "circular": plan.circular,
        "max_new_tokens": options.max_new_tokens,
        "frames": options.frames,
    }


def model_identity(folder: str | Path) -> str:
    """A saved model as a fingerprint names it: its folder, its config and its weight files' sizes and times."""
    folder = Path(folder).resolve()
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return f"{folder} ({digest.hexdigest()[:16]})"


def resumable(out: Path, print_: dict, patterns: tuple[str, ...] = ("predictions.jsonl",)) -> dict:
    """The records a previous run of the same fingerprint left in ``out`` (files matching ``patterns``), keyed by
    (index, rotation); UsageError when they belong to another run. Writes this run's fingerprint."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [path for pattern in patterns for path in sorted(out.glob(pattern))]
    stored = out / "fingerprint.json"
    if paths and not stored.is_file():
        raise UsageError(
            f"{out} holds predictions without a fingerprint.json (from an older ivl): pass another "
            f"--out, or delete {out} to start over"
        )
    if paths:
        before = json.loads(stored.read_text())
        differs = [key for key in print_ if before.get(key) != print_[key]]
        if differs:
            key = differs[0]
            raise UsageError(
                f"{out} holds predictions of another run ({key} was {before.get(key)!r}, is now "
                f"{print_[key]!r}); pass another --out, or delete {out} to start over"
            )
    stored.write_text(json.dumps(print_, indent=2) + "\n")
    done = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[(record["index"], record.get("rotation", 0))] = record
    return done


def evaluate_file(engine: ChatEngine, tsv: Path, out: Path, options: Options, model: str = "") -> dict:
    """Scores of one benchmark file (writes ``out/predictions.jsonl``, ``out/predictions.tsv`` and
    ``out/scores.json``). ``model`` names the model in the fingerprint."""
    the_plan = plan(tsv, options)
    done = resumable(out, fingerprint(the_plan, tsv, options, model))
    todo = [(item, r) for item, r in the_plan.jobs if (item.index, r) not in done]
    with (
        (out / "predictions.jsonl").open("a") as f,
        tqdm(total=len(the_plan.jobs), desc=tsv.stem, unit="q", initial=len(the_plan.jobs) - len(todo)) as bar,
    ):
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            for (item, rotation), text in zip(batch, generate(engine, batch, the_plan.benchmark, options)):
                record = make_record(item, rotation, text, the_plan.benchmark)
                done[(item.index, rotation)] = record
                f.write(json.dumps(record) + "\n")
            f.flush()
            bar.update(len(batch))
    records = [done[(item.index, r)] for item, r in the_plan.jobs]
    scores = finish(the_plan, records, tsv, options)
    write_outputs(out, the_plan, records, scores)
    return scores


def finish(the_plan: Plan, records: list[dict], tsv: Path, options: Options) -> dict:
    """scores.json's content."""
    if the_plan.scored:
        scores = summarise(records, the_plan.items, the_plan.benchmark, the_plan.circular)
    else:
        scores = {
            "items": len(the_plan.items),
            "rows": len(records),
            "circular": the_plan.circular is not None,
            "score": None,
            "predictions_only": True,
            "headline": None,
            "note": "the file has no answer column: predictions.tsv is for the benchmark's server",
        }
    scores.update(
        benchmark=the_plan.name,
        file=str(tsv),
        dataset=the_plan.benchmark.name,
        metric=the_plan.benchmark.metric,
        note=scores.get("note") or the_plan.benchmark.note,
        skipped=len(the_plan.skipped),
        skipped_rows=the_plan.skipped[:50],
        frames=options.frames,
    )
    return scores


def write_outputs(out: Path, the_plan: Plan, records: list[dict], scores: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    write_vlmevalkit_predictions(out / "predictions.tsv", the_plan, records)


def write_vlmevalkit_predictions(path: Path, the_plan: Plan, records: list[dict]) -> None:
    """VLMEvalKit's prediction file (as its ``dump`` writes a TSV: every field quoted): the benchmark's columns but
    the image, and ``prediction``. A rotation asked here is written as VLMEvalKit's circular copy: index + k x
    1,000,000, the options rotated, the answer the letter the right option moved to."""
    item_by_index = {item.index: item for item in the_plan.items}
    rows = []
    for record in records:
        item = item_by_index[record["index"]]
        row = dict(item.row)
        rotation = record.get("rotation", 0)
        if rotation:
            shown = prompts.rotate(item.options, rotation)
            row.update(shown)
            row["index"] = (
                str(int(item.index) + rotation * COPY) if item.index.isdigit() else f"{item.index}-{rotation}"
            )
            if item.answers:
                row["answer"] = record["reference"]
        row["prediction"] = record["prediction"]
        rows.append(row)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)


def generate(engine: ChatEngine, batch: list[tuple[Item, int]], benchmark: Benchmark, options: Options) -> list[str]:
    chat = []
    for item, rotation in batch:
        messages, images = prompts.build(item, benchmark.prompt, rotation)
        videos = []
        if item.video is not None:
            try:
                frames, _ = load_video(
                    Media("video", path=str(item.video), options={"nframes": options.frames} if options.frames else {}),
                    f"index {item.index}",
                    max_frames=options.frames or 64,
                )
            except BadSample as error:
                raise UsageError(str(error)) from None
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


def make_record(item: Item, rotation: int, output: str, benchmark: Benchmark) -> dict:
    """One question's record: the raw output (what VLMEvalKit's metrics read), what was read from it, the
    reference and the score (none for a file without answers)."""
    record = {
        "index": item.index,
        "rotation": rotation,
        "question": item.question,
        "prediction": output,
        "category": item.category,
    }
    metric = benchmark.metric
    if metric == "mcq":
        options, truth = item.options, item.answers[0] if item.answers else None
        if not options and benchmark.prompt == "mmmu":  # an open MMMU question, as VLMEvalKit's MMMU_preproc
            options, truth = {"A": item.answers[0] if item.answers else "", "B": "Other Answers"}, "A"
        shown = prompts.rotate(options, rotation)
        letter = answers.read_choice(output, shown)
        record.update(extracted=letter, readable=letter is not None)
        if truth is not None:
            reference = next(k for k, v in shown.items() if v == options[truth])
            record.update(reference=reference, score=float(letter == reference))
        return record
    if metric == "yes_no":
        said = answers.read_yes_no(output)
        record.update(extracted=said, readable=said is not None)
        if item.answers is not None:
            record.update(reference=item.answers[0], score=float(said == item.answers[0]))
        return record
    record["extracted"] = output.strip()
    if item.answers is None:
        return record
    if metric == "ocrbench":
        value = scoring.ocrbench_hit(output, item.answers, item.category)
    elif metric == "mathvista":
        value, record["extracted"] = mathvista(output, item)
    elif metric == "exact":
        value = scoring.exact_match(
            output, item.answers, reduce=max if benchmark.reduce == "max" else lambda v: sum(v) / len(v)
        )
    else:
        value = scoring.score(metric, output, item.answers)
    record.update(reference=item.answers, score=value)
    return record


def mathvista(output: str, item: Item) -> tuple[float, str]:
    """MathVista's exact-match part, as VLMEvalKit's prefetch before its judge: a choice read from the output
    (multi_choice), ``int`` or ``float`` equality (integer, float answers); free-form text must equal the answer
    (VLMEvalKit's prefetch never scores those; its judge does)."""
    row, answer = item.row, item.answers[0]
    if row.get("question_type") == "multi_choice" and row.get("choices"):
        try:
            choices = [str(c) for c in ast.literal_eval(row["choices"])]
        except (ValueError, SyntaxError):
            return 0.0, output.strip()
        options = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", choices))
        letter = answers.read_choice(output, options)
        truth = row.get("answer_option") or next((k for k, v in options.items() if v == answer), None)
        return float(letter is not None and letter == truth), letter or ""
    try:
        if row.get("answer_type") == "integer":
            return float(int(output) == int(answer)), output.strip()
        if row.get("answer_type") == "float":
            return float(float(output) == float(answer)), output.strip()
    except ValueError:
        return 0.0, output.strip()
    return float(output.strip() == answer.strip()), output.strip()


def table(results: list[dict]) -> str:
    lines = [
        "| benchmark | dataset | metric | frames | items | score | unreadable | skipped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        headline = r.get("headline")
        if headline is None:
            shown = "predictions only"
        elif headline["unit"] == "points":
            shown = f"{headline['value']:.1f} ({headline['name']})"
        else:
            shown = f"{100 * headline['value']:.1f}" + (
                "" if headline["name"] == "accuracy" else f" ({headline['name']})"
            )
        lines.append(
            f"| {r['benchmark']} | {r['dataset']} | {r['metric']}{' (circular)' if r['circular'] else ''}"
            f" | {r['frames'] or ''} | {r['items']} | {shown} | {r.get('unreadable', 0)} | {r['skipped']} |"
        )
    return "\n".join(lines)


def log_mlflow(
    results: list[dict], tracking_uri: str | None, experiment: str, run_name: str, params: dict
) -> str | None:
    """Scores as MLflow metrics ``eval/<benchmark>[/<frames>f]/score`` (the headline) and per category, in the
    active run or a new one; returns its id."""
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
            for key, value in metrics_of(r).items():
                mlflow.log_metric(key, value)
        return run.info.run_id
    finally:
        if active is None:
            mlflow.end_run()


def metrics_of(scores: dict) -> dict[str, float]:
    """``eval/<benchmark>[/<frames>f]/score`` (the headline) and ``.../<category>`` for one benchmark's scores."""
    if scores.get("headline") is None:
        return {}
    key = f"eval/{scores['benchmark']}" + (f"/{scores['frames']}f" if scores.get("frames") else "")
    metrics = {f"{key}/score": scores["headline"]["value"]}
    metrics.update({f"{key}/{metric_name(c)}": v for c, v in scores["categories"].items()})
    return metrics


def metric_name(category: str) -> str:
    safe = "".join(c if c.isalnum() or c in "_-. /" else "_" for c in category)
    return safe.strip() or "all"
