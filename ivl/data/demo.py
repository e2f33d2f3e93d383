"""python -m ivl.data.demo --out DIR: the small multimodal corpus of the embedded default.

Built from files that install from the package registries (nothing is downloaded at run time), with answers that
can be checked exactly and tasks a tiny model can learn in minutes, so that a held-out score above chance shows
the whole stack works:

- images/     easy-vqa's real synthetic-shape VQA (fixed train/test split): "what color is the shape?",
              "what shape is in the image?", "is there a red shape?" (13 answers in all).
- documents/  rendered pages with one large printed digit ("What digit is written on the page?", 10 answers)
              and bar charts of real stock prices (matplotlib's Stocks.csv): "Which stock is higher, X or Y?".
- videos/     short H.264 clips in which coloured squares appear one after another: "Which color appears
              first?" (4 answers) and "How many squares appear?" (2 or 3).

Each subset has train.jsonl and val.jsonl in LLaVA format, with media next to them.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"the demo corpus needs {name}; pip install it (see pyproject's [demo] extra)")
    return Path(spec.submodule_search_locations[0])


def _record(media_key: str, media: str, question: str, answer: str, task: str) -> dict:
    return {media_key: media, "task": task, "answer": answer,
            "conversations": [{"from": "human", "value": f"<{media_key}>\n{question} Answer in one word."},
                              {"from": "gpt", "value": answer}]}


def _write(folder: Path, split: str, records: list[dict]) -> None:
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def build_images(out: Path, rng: random.Random, n_train: int, n_val: int) -> None:
    """easy-vqa questions over its own images; val comes from easy-vqa's test split."""
    root = _package_dir("easy_vqa") / "data"
    folder = out / "images"
    (folder / "media").mkdir(parents=True, exist_ok=True)
    for split, source, n in (("train", "train", n_train), ("val", "test", n_val)):
        questions = json.loads((root / source / "questions.json").read_text())
        picks = rng.sample(questions, n)
        records = []
        for question, answer, image_id in picks:
            name = f"{source}-{image_id}.png"
            if not (folder / "media" / name).exists():
                shutil.copy(root / source / "images" / f"{image_id}.png", folder / "media" / name)
            question = question[0].upper() + question[1:]
            records.append(_record("image", f"media/{name}", question, answer, "easy-vqa"))
        _write(folder, split, records)


def _font(size: int) -> ImageFont.FreeTypeFont:
    path = _package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return ImageFont.truetype(str(path), size)


def _digit_page(digit: int, rng: random.Random) -> Image.Image:
    page = Image.new("RGB", (112, 112), (250, 250, 245))
    draw = ImageDraw.Draw(page)
    draw.text((rng.randint(24, 44), rng.randint(6, 20)), str(digit), fill=(20, 20, 20), font=_font(72))
    for _ in range(rng.randint(1, 3)):  # a few faint "lines of text" so the page is not just the digit
        y = rng.randint(90, 104)
        draw.line((8, y, rng.randint(40, 104), y), fill=(170, 170, 170), width=2)
    return page


def _stock_prices() -> tuple[list[str], list[list[float]]]:
    path = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "Stocks.csv"
    rows = [r for r in csv.reader(line for line in path.read_text().splitlines() if not line.startswith("#"))]
    header, rows = rows[0], rows[1:]
    tickers = [t for t in header[1:] if not t.startswith("^")]
    prices = [[float(r[1 + header[1:].index(t)]) if r[1 + header[1:].index(t)] else float("nan") for t in tickers]
              for r in rows]
    return tickers, prices


def _bar_chart(a: str, b: str, va: float, vb: float) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.12, 1.12), dpi=100)
    ax.bar([0, 1], [va, vb], color=["#3060d0", "#d06030"])
    ax.set_xticks([0, 1], [a, b], fontsize=6)
    ax.tick_params(axis="y", labelsize=4)
    fig.tight_layout(pad=0.2)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return image


def build_documents(out: Path, rng: random.Random, n_train: int, n_val: int) -> None:
    folder = out / "documents"
    (folder / "media").mkdir(parents=True, exist_ok=True)
    tickers, prices = _stock_prices()
    for split, n in (("train", n_train), ("val", n_val)):
        records = []
        for i in tqdm(range(n), desc=f"documents/{split}", leave=False):
            name = f"{split}-{i:05d}.png"
            if i % 2 == 0:
                digit = rng.randrange(10)
                _digit_page(digit, rng).save(folder / "media" / name)
                records.append(_record("image", f"media/{name}", "What digit is written on the page?", str(digit),
                                       "document-digit"))
            else:
                while True:  # two stocks with prices on the same (real) month, clearly different
                    row = rng.choice(prices)
                    a, b = rng.sample(range(len(tickers)), 2)
                    va, vb = row[a], row[b]
                    if va == va and vb == vb and abs(va - vb) > 0.2 * max(va, vb):
                        break
                _bar_chart(tickers[a], tickers[b], va, vb).save(folder / "media" / name)
                question = f"Which stock is higher, {tickers[a]} or {tickers[b]}?"
                records.append(_record("image", f"media/{name}", question, tickers[a] if va > vb else tickers[b],
                                       "chart-compare"))
        _write(folder, split, records)


def _clip(path: Path, sequence: list[str], rng: random.Random, size: int = 56, frames_per_step: int = 2) -> None:
    """Squares of the given colours appear one by one (and stay), on a grey background."""
    import av

    frame = np.full((size, size, 3), 90, np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for _ in range(frames_per_step):  # an empty first step
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        for color in sequence:
            x, y = rng.randrange(0, size - 16), rng.randrange(0, size - 16)
            frame[y:y + 16, x:x + 16] = COLORS[color]
            for _ in range(frames_per_step):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.copy(), format="rgb24")))
        container.mux(stream.encode())


def build_videos(out: Path, rng: random.Random, n_train: int, n_val: int) -> None:
    folder = out / "videos"
    (folder / "media").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        records = []
        for i in tqdm(range(n), desc=f"videos/{split}", leave=False):
            name = f"{split}-{i:05d}.mp4"
            sequence = rng.sample(list(COLORS), rng.choice([2, 3]))
            _clip(folder / "media" / name, sequence, rng)
            if i % 2 == 0:
                records.append(_record("video", f"media/{name}", "Which color appears first?", sequence[0],
                                       "video-order"))
            else:
                records.append(_record("video", f"media/{name}", "How many squares appear?",
                                       ["two", "three"][len(sequence) - 2], "video-count"))
        _write(folder, split, records)


def build(out: Path, seed: int = 0, scale: float = 1.0) -> dict[str, float]:
    """Build the corpus under ``out``; returns seconds per subset."""
    rng = random.Random(seed)
    sizes = {"images": (1200, 300), "documents": (800, 200), "videos": (400, 100)}
    timings = {}
    for name, builder in (("images", build_images), ("documents", build_documents), ("videos", build_videos)):
        start = time.perf_counter()
        n_train, n_val = (max(2, round(n * scale)) for n in sizes[name])
        builder(out, rng, n_train, n_val)
        timings[name] = time.perf_counter() - start
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every subset's size")
    parser.add_argument("--eval", action="store_true",
                        help="also write VLMEvalKit TSV benchmarks from the val splits to OUT/eval (builds the "
                             "corpus first if OUT has none)")
    args = parser.parse_args(argv)
    if not (args.eval and (args.out / "images" / "val.jsonl").is_file()):
        timings = build(args.out, args.seed, args.scale)
        for name, seconds in timings.items():
            print(f"{name}: {args.out / name} ({seconds:.1f} s)")
    if args.eval:
        from ivl.data.demo_eval import build_eval

        for path in build_eval(args.out, seed=args.seed):
            print(f"benchmark: {path}")


if __name__ == "__main__":
    main()
