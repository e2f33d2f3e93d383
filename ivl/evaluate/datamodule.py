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

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ivl.data.processing import Processor
from ivl.evaluate.runner import (
    Options,
    fingerprint,
    finish,
    generate,
    make_record,
    metrics_of,
    plan,
    resumable,
    write_outputs,
)
from ivl.serve.engine import ChatEngine


class EvalDataModule(L.LightningDataModule):
    """Args:
    benchmarks: VLMEvalKit TSV files.
    metric, circular, batch_size, max_new_tokens, limit, frames, media_root, skip_bad: as ``python -m
        ivl.evaluate`` (``frames``: one value here).
    out: where predictions and scores are written.
    processor: a folder with tokenizer files (the model's), None: the bundled tokenizer; pixel budgets below.
    """

    def __init__(
        self,
        benchmarks: list[str],
        metric: str = "auto",
        circular: bool = False,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        limit: int | None = None,
        frames: int | None = None,
        media_root: str | None = None,
        skip_bad: bool = False,
        out: str = "runs/eval",
        processor: str | None = None,
        image_min_pixels: int | None = None,
        image_max_pixels: int | None = None,
        video_max_pixels: int | None = None,
    ):
        super().__init__()
        self._engine: ChatEngine | None = None
        self.benchmarks = [Path(b) for b in benchmarks]
        missing = [str(b) for b in self.benchmarks if not b.is_file()]
        if missing:
            raise FileNotFoundError(f"data.benchmarks: no such file(s) {missing}")
        self.options = Options(
            metric=metric,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            limit=limit,
            circular=circular,
            frames=frames,
            media_root=Path(media_root) if media_root else None,
            skip_bad=skip_bad,
        )
        self.out = Path(out)
        pixels = dict(
            image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels, video_max_pixels=video_max_pixels
        )
        self.processor = Processor.from_pretrained(processor, **{k: v for k, v in pixels.items() if v})
        self.records: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        self.plans = [plan(path, self.options) for path in self.benchmarks]

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _model_identity(self) -> str:
        """The checkpoint the trainer restored (its path, size and time), else the stage's own settings."""
        trainer = self.trainer
        ckpt = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        if ckpt and Path(ckpt).exists():
            stat = Path(ckpt).stat()
            return f"{Path(ckpt).resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        settings = json.dumps(dict(getattr(module, "hparams", {})), sort_keys=True, default=str)
        return f"{type(module).__name__} {hashlib.sha256(settings.encode()).hexdigest()[:16]} (no checkpoint)"

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        batches = []
        self.records = {}
        for the_plan, path in zip(self.plans, self.benchmarks):
            print_ = fingerprint(the_plan, path, self.options, self._model_identity())
            # a previous (killed) run's finished records and every rank's partial file
            done = resumable(self.out / the_plan.name, print_, ("predictions.jsonl", "partial-rank*.jsonl"))
            jobs = [(the_plan.name, item, r) for item, r in the_plan.jobs if (item.index, r) not in done]
            self.records[the_plan.name] = list(done.values()) if rank == 0 else []  # gathered once, at the end
            mine = jobs[rank::world]  # each rank its share; together the whole benchmark
            size = self.options.batch_size
            batches += [mine[i : i + size] for i in range(0, len(mine), size)]
        return DataLoader(_Batches(batches), batch_size=None, collate_fn=lambda batch: batch)

    def evaluate_batch(self, model, batch: list) -> None:
        """Generate and score one batch; each record is also appended to this rank's partial file, so that a
        killed run resumes from it."""
        if self._engine is None or self._engine.model is not model:
            self._engine = ChatEngine(model, self.processor, capacity=self.options.batch_size)  # its slots, kept
        plans = {p.name: p for p in self.plans}
        rank, _ = self._rank()
        for name in dict.fromkeys(name for name, *_ in batch):
            jobs = [(item, rotation) for n, item, rotation in batch if n == name]
            benchmark = plans[name].benchmark
            for (item, rotation), text in zip(jobs, generate(self._engine, jobs, benchmark, self.options)):
                record = make_record(item, rotation, text, benchmark)
                self.records[name].append(record)
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
        for the_plan, path in zip(self.plans, self.benchmarks):
            by_key = {(r["index"], r.get("rotation", 0)): r for r in records[the_plan.name]}
            rows = [by_key[(item.index, r)] for item, r in the_plan.jobs]
            scores = finish(the_plan, rows, path, self.options)
            metrics.update(metrics_of(scores))
            if trainer.is_global_zero:
                write_outputs(self.out / the_plan.name, the_plan, rows, scores)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has read the partial files' records before they go
        for the_plan in self.plans:
            (self.out / the_plan.name / f"partial-rank{trainer.global_rank}.jsonl").unlink(missing_ok=True)
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
