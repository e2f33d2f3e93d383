"""Benchmarks as the ``test`` data of the stage CLI, so that an evaluation runs on the model a config builds (or a
checkpoint restores) and logs to that run's MLflow:

    python -m ivl.experiments test --config experiments/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt \\
        --data ivl.evaluate.EvalDataModule --data.benchmarks '[data/demo/eval/charts.tsv]'

Each test batch is a list of questions; the stage's ``test_step`` hands it to ``evaluate_batch`` (the same prompts,
generation and scoring as ``python -m ivl.evaluate``), and ``finish`` gathers every rank's records, writes
``<out>/<benchmark>/predictions.jsonl`` and ``scores.json`` and returns the metrics the stage logs
(``eval/<benchmark>/score`` and per category). Records also go to per-rank partial files as they come: a killed
run, started again, asks only the questions that have no record yet.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ivl.data.processing import Processor
from ivl.evaluate.runner import Options, _generate, _record, _metric_name, metric_for, summarise
from ivl.evaluate.tsv import read_tsv
from ivl.serve.engine import Engine


class EvalDataModule(L.LightningDataModule):
    """Args:
        benchmarks: VLMEvalKit TSV files.
        metric, circular, batch_size, max_new_tokens, limit, frames, media_root, skip_bad: as ``python -m
            ivl.evaluate`` (``frames``: one value here).
        out: where predictions and scores are written.
        processor: a folder with tokenizer files (the model's), None: the bundled tokenizer; pixel budgets below.
    """

    def __init__(self, benchmarks: list[str], metric: str = "auto", circular: bool = False, batch_size: int = 8,
                 max_new_tokens: int = 32, limit: int | None = None, frames: int | None = None,
                 media_root: str | None = None, skip_bad: bool = False, out: str = "runs/eval",
                 processor: str | None = None, image_min_pixels: int | None = None,
                 image_max_pixels: int | None = None, video_max_pixels: int | None = None):
        super().__init__()
        self._engine: Engine | None = None
        self.benchmarks = [Path(b) for b in benchmarks]
        missing = [str(b) for b in self.benchmarks if not b.is_file()]
        if missing:
            raise FileNotFoundError(f"data.benchmarks: no such file(s) {missing}")
        self.options = Options(metric=metric, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
                               circular=circular, frames=frames, media_root=Path(media_root) if media_root else None,
                               skip_bad=skip_bad)
        self.out = Path(out)
        pixels = dict(image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels,
                      video_max_pixels=video_max_pixels)
        self.processor = Processor.from_pretrained(processor, **{k: v for k, v in pixels.items() if v})
        self.records: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        self.files = []  # (name, items, metric, skipped)
        for path in self.benchmarks:
            items, skipped = read_tsv(path, self.options.media_root, self.options.skip_bad)
            items = items[: self.options.limit] if self.options.limit is not None else items
            self.files.append((path.stem, items, metric_for(items, self.options.metric), skipped))

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _done(self, name: str) -> dict:
        """Records a previous (killed) run left: its finished predictions.jsonl and every rank's partial file."""
        folder, done = self.out / name, {}
        for path in [folder / "predictions.jsonl", *sorted(folder.glob("partial-rank*.jsonl"))]:
            if path.is_file():
                for line in path.read_text().splitlines():
                    if line.strip():
                        record = json.loads(line)
                        done[(record["index"], record.get("rotation", 0))] = record
        return done

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        batches = []
        self.records = {}
        for name, items, metric, _ in self.files:
            done = self._done(name)
            rotations = self.options.circular and metric == "mcq"
            jobs = [(name, item, r) for item in items for r in (range(len(item.options)) if rotations else [0])
                    if (item.index, r) not in done]
            self.records[name] = list(done.values()) if rank == 0 else []  # gathered once, at the end
            mine = jobs[rank::world]  # each rank its share; together the whole benchmark
            size = self.options.batch_size
            batches += [mine[i:i + size] for i in range(0, len(mine), size)]
        return DataLoader(_Batches(batches), batch_size=None, collate_fn=lambda batch: batch)

    def evaluate_batch(self, model, batch: list) -> None:
        """Generate and score one batch; each record is also appended to this rank's partial file, so that a
        killed run resumes from it."""
        if self._engine is None or self._engine.model is not model:
            self._engine = Engine(model, self.processor)  # kept: its decoders serve every later batch
        texts = _generate(self._engine, [(item, rotation) for _, item, rotation in batch], self.options)
        metrics = {name: metric for name, _, metric, _ in self.files}
        rank, _ = self._rank()
        for (name, item, rotation), text in zip(batch, texts):
            record = _record(item, rotation, text, metrics[name])
            self.records[name].append(record)
            (self.out / name).mkdir(parents=True, exist_ok=True)
            with (self.out / name / f"partial-rank{rank}.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self, trainer) -> dict[str, float]:
        """Every rank's records together: files written (rank 0) and the metrics to log."""
        records = self.records
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = {name: [r for part in gathered for r in part[name]] for name in records}
        metrics = {}
        for name, items, metric, skipped in self.files:
            circular = self.options.circular and metric == "mcq"
            scores = summarise(records[name], items, metric, circular)
            scores.update(benchmark=name, metric=metric, skipped=len(skipped), skipped_rows=skipped[:50],
                          frames=self.options.frames, options={k: str(v) for k, v in asdict(self.options).items()})
            metrics[f"eval/{name}/score"] = scores["score"]
            metrics.update({f"eval/{name}/{_metric_name(c)}": v for c, v in scores["categories"].items()})
            if trainer.is_global_zero:
                folder = self.out / name
                folder.mkdir(parents=True, exist_ok=True)
                order = {item.index: i for i, item in enumerate(items)}
                rows = sorted(records[name], key=lambda r: (order[r["index"]], r.get("rotation", 0)))
                (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                (folder / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has read the partial files' records before they go
        for name, *_ in self.files:
            (self.out / name / f"partial-rank{trainer.global_rank}.jsonl").unlink(missing_ok=True)
        return metrics


class _Batches(IterableDataset):
    """This rank's batches, already sharded: iterable, so that Lightning does not shard them again with a
    DistributedSampler (which would also pad the last rank with repeated questions)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
