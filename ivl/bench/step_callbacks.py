"""Callbacks that measure training steps from the outside: wall time and peak memory (``StepTimer``), where the
host waits for the GPU (``SyncCounter``), a profile of one step (``StepProfiler``)."""

from __future__ import annotations

import gzip
import shutil
import time
import traceback
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from ivl.bench import trace


class StepTimer(Callback):
    """Wall time of each optimizer step after the warm-up (device synchronised), and the peak memory over them.
    Steps from ``last`` on (a profiled one) are not timed."""

    def __init__(self, warmup: int, last: int | None = None):
        self.warmup, self.last, self.times, self.peak_gib, self._start = warmup, last, [], float("nan"), None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module):
        self._began = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step < self.warmup and trainer.is_global_zero:  # compilation and autotuning show here
            print(
                f"  warm-up step {trainer.global_step} begins at {time.perf_counter() - self._began:.0f} s", flush=True
            )
        if trainer.global_step == self.warmup and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if trainer.global_step >= self.warmup and (self.last is None or trainer.global_step < self.last):
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            self._sync(pl_module)
            self.times.append(time.perf_counter() - self._start)
            self._start = None

    def on_train_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=pl_module.device)
            self.peak_gib = float(trainer.strategy.reduce(peak, reduce_op="max"))


class SyncCounter(Callback):
    """Counts the times the host waits for the GPU in step ``at`` (after the timed ones), with where each wait
    comes from: a step that waits cannot run ahead of the GPU, and where the host is the slower side the GPU then
    idles. Uses torch's sync debug mode (``.item()``, ``nonzero``, copies from pageable memory, ...)."""

    def __init__(self, at: int):
        self.at, self.origins, self._saved = at, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.at or pl_module.device.type != "cuda":
            return
        torch.cuda.synchronize()
        self.origins, self._saved = [], warnings.catch_warnings()
        shown = warnings.showwarning

        def record(message, *args, **kwargs):
            if "synchroniz" not in str(message):
                return shown(message, *args, **kwargs)
            ours = [
                f
                for f in traceback.extract_stack()[:-1]
                if "/torch/" not in f.filename and "/lightning/" not in f.filename and "/warnings.py" not in f.filename
            ]
            frame = ours[-1] if ours else traceback.extract_stack()[-2]
            self.origins.append(f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno}")

        self._saved.__enter__()  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._saved is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._saved.__exit__(None, None, None)
        self._saved = None


class StepProfiler(Callback):
    """Profiles step ``at`` (after the timed ones) on every rank: a gzipped Chrome trace per rank and the summary
    of ``ivl.bench.trace`` (printed and written beside it)."""

    def __init__(self, at: int, folder: Path, tag: str):
        self.at, self.folder, self.tag, self._prof = at, folder, tag, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._prof is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{self.tag}-rank{trainer.global_rank}"  # not Path.with_suffix: a tag may hold a dot ("ckpt0.75")
        raw = self.folder / f"{stem}.json"
        self._prof.export_chrome_trace(str(raw))
        with raw.open("rb") as f, gzip.open(f"{raw}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
        try:
            text = trace.format_summary(trace.summarise(f"{raw}.gz"))
        except ValueError as error:  # a CPU run has no kernels
            text = str(error)
        text += "\n\n" + self._prof.key_averages().table(
            sort_by="self_device_time_total" if pl_module.device.type == "cuda" else "self_cpu_time_total",
            row_limit=30,
            max_name_column_width=80,
        )
        (self.folder / f"{stem}.txt").write_text(text + "\n")
        print(f"# profile of {self.tag}, rank {trainer.global_rank}\n{text.split(chr(10) * 2)[0]}", flush=True)
        self._prof = None
