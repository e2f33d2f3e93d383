"""Dataloader throughput of the Image / Document / Video DataModules on the demo corpus (CPU), and at scale.

Default: times one epoch of packed training batches per DataModule (after setup, whose pass counting sample
lengths is reported separately), for each worker count.

``--scale N``: a generated corpus of N LLaVA-style records over easy-vqa's few thousand real images, set up twice in
fresh processes (first: lengths counted from headers and cached; second: read from the cache), each with its wall
time and peak RSS; then samples/s and tokens/s of the first batches per worker count; and a generated
``--video-minutes`` video (30 fps) from which 64 frames are sampled, with its time and peak RSS.
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
    parser.add_argument("--scale", type=int, default=None, help="generated records (e.g. 1000000): the scale mode")
    parser.add_argument("--video-minutes", type=float, default=60.0)
    parser.add_argument("--batches", type=int, default=100, help="scale mode: batches timed per worker count")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-data"), help="scale mode: generated files")


def run(args: argparse.Namespace) -> None:
    if args.scale:
        return run_scale(args)
    modules = {
        "ImageDataModule": (ImageDataModule, "images"),
        "DocumentDataModule": (DocumentDataModule, "documents"),
        "VideoDataModule": (VideoDataModule, "videos"),
    }
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} | "
        f"{datetime.date.today()} | packed to {args.pack_tokens} tokens\n"
    )
    print("| DataModule | workers | samples | setup (length pass) s | epoch s | samples/s | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (cls, subset) in modules.items():
        for workers in args.workers:
            dm = cls(
                train=[{"path": str(args.corpus / subset / "train.jsonl")}],
                pack_tokens=args.pack_tokens,
                num_workers=workers,
            )
            start = time.perf_counter()
            dm.setup("fit")
            setup_s = time.perf_counter() - start
            samples = tokens = 0
            start = time.perf_counter()
            for batch in dm.train_dataloader():
                samples += len(batch["sources"])
                tokens += batch["input_ids"].numel()
            epoch_s = time.perf_counter() - start
            print(
                f"| {name} | {workers} | {samples} | {setup_s:.1f} | {epoch_s:.1f} | {samples / epoch_s:.0f} | "
                f"{tokens / epoch_s:,.0f} |",
                flush=True,
            )


# ---- scale mode ------------------------------------------------------------------------------------------------


def scale_corpus(out: Path, n: int) -> Path:
    """N LLaVA-style records over easy-vqa's train images (absolute paths), written once."""
    import json

    from ivl.data.demo import _package_dir

    path = out / f"records-{n}.jsonl"
    if path.is_file():
        return path
    root = _package_dir("easy_vqa") / "data" / "train"
    questions = json.loads((root / "questions.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            question, answer, image_id = questions[i % len(questions)]
            f.write(
                json.dumps(
                    {
                        "image": str(root / "images" / f"{image_id}.png"),
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{question}"},
                            {"from": "gpt", "value": answer},
                        ],
                    }
                )
                + "\n"
            )
    return path


def scale_video(out: Path, minutes: float, fps: int = 30, size: int = 64) -> Path:
    """A generated video: a square moving over a gradient, a keyframe every 2 seconds (as encoders default to)."""
    import av
    import numpy as np

    path = out / f"video-{minutes:g}min.mp4"
    if path.is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    background = np.tile(np.linspace(0, 200, size, dtype=np.uint8)[None, :, None], (size, 1, 3))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.options = {"preset": "ultrafast"}
        for i in range(int(minutes * 60 * fps)):
            frame = background.copy()
            x = (i // 4) % (size - 8)
            frame[20:28, x : x + 8] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (clean peak RSS); it prints one JSON line."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


_PEAK = """
def peak_mib():  # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_SETUP = (
    _PEAK
    + """
import json, time
from ivl.data import ImageDataModule
start = time.perf_counter()
dm = ImageDataModule(train=[{{"path": "{path}"}}], pack_tokens={pack})
dm.setup("fit")
batches = len(dm.train_dataloader())
print(json.dumps({{"seconds": time.perf_counter() - start, "batches": batches, "rss_gib": peak_mib() / 1024}}))
"""
)

_VIDEO = (
    _PEAK
    + """
import json, time
from ivl.data.corpus import Media
from ivl.data.media import load_video
before = peak_mib()
start = time.perf_counter()
frames, rate = load_video(Media("video", path="{path}"), "bench", fps=2.0, max_frames=64)
print(json.dumps({{"seconds": time.perf_counter() - start, "frames": len(frames), "rss_mib": peak_mib(),
                  "rss_before_mib": before}}))
"""
)


def run_scale(args: argparse.Namespace) -> None:
    import shutil

    from ivl.data import ImageDataModule

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} | "
        f"{datetime.date.today()} | {args.scale:,} records, packed to {args.pack_tokens} tokens\n"
    )
    start = time.perf_counter()
    corpus = scale_corpus(args.out, args.scale)
    print(f"generated corpus: {corpus} ({time.perf_counter() - start:.0f} s)", flush=True)
    shutil.rmtree(corpus.parent / ".ivl-cache", ignore_errors=True)
    print("| setup | seconds | peak RSS GiB | batches |\n| --- | --- | --- | --- |")
    for label in ("first (counts lengths, writes the cache)", "second (reads the cache)"):
        r = _child(_SETUP.format(path=corpus, pack=args.pack_tokens))
        print(f"| {label} | {r['seconds']:.1f} | {r['rss_gib']:.2f} | {r['batches']:,} |", flush=True)
    print("\n| workers | batches | samples/s | tokens/s |\n| --- | --- | --- | --- |")
    for workers in args.workers:
        dm = ImageDataModule(train=[{"path": str(corpus)}], pack_tokens=args.pack_tokens, num_workers=workers)
        dm.setup("fit")
        samples = tokens = n = 0
        start = time.perf_counter()
        for batch in dm.train_dataloader():
            samples += len(batch["sources"])
            tokens += batch["input_ids"].numel()
            n += 1
            if n == args.batches:
                break
        seconds = time.perf_counter() - start
        print(f"| {workers} | {n} | {samples / seconds:.0f} | {tokens / seconds:,.0f} |", flush=True)
    start = time.perf_counter()
    video = scale_video(args.out, args.video_minutes)
    print(f"\ngenerated video: {video} ({time.perf_counter() - start:.0f} s)")
    r = _child(_VIDEO.format(path=video))
    print(
        f"sampled {r['frames']} frames of the {args.video_minutes:g}-minute video in {r['seconds']:.2f} s, peak "
        f"RSS {r['rss_mib']:.0f} MiB ({r['rss_mib'] - r['rss_before_mib']:.0f} MiB above the interpreter with "
        f"its imports)"
    )
