"""Dataloader throughput of the Image / Document / Video DataModules on the demo corpus (CPU).

Times one epoch of packed training batches per DataModule (after setup, whose one encoding pass to measure
sample lengths is reported separately), for each worker count.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from ivl.data import DocumentDataModule, ImageDataModule, VideoDataModule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="a folder built by python -m ivl.data.demo")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--pack-tokens", type=int, default=4096)


def run(args: argparse.Namespace) -> None:
    modules = {"ImageDataModule": (ImageDataModule, "images"), "DocumentDataModule": (DocumentDataModule, "documents"),
               "VideoDataModule": (VideoDataModule, "videos")}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} | "
          f"{datetime.date.today()} | packed to {args.pack_tokens} tokens\n")
    print("| DataModule | workers | samples | setup (length pass) s | epoch s | samples/s | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (cls, subset) in modules.items():
        for workers in args.workers:
            dm = cls(train=[{"path": str(args.corpus / subset / "train.jsonl")}], pack_tokens=args.pack_tokens,
                     num_workers=workers)
            start = time.perf_counter()
            dm.setup("fit")
            setup_s = time.perf_counter() - start
            samples = tokens = 0
            start = time.perf_counter()
            for batch in dm.train_dataloader():
                samples += len(batch["sources"])
                tokens += batch["input_ids"].numel()
            epoch_s = time.perf_counter() - start
            print(f"| {name} | {workers} | {samples} | {setup_s:.1f} | {epoch_s:.1f} | {samples / epoch_s:.0f} | "
                  f"{tokens / epoch_s:,.0f} |", flush=True)
