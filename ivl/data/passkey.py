"""Passkey retrieval: a 5-digit key hidden in filler text, asked for after ``d`` tokens of more filler.

The test of long-range recall used since Landmark Attention (Mohtashami & Jaggi, 2023): a sliding window of W
tokens cannot see a key more than W tokens back, so a window-attention-only model falls to chance (1 in 100,000 for
5 digits) beyond W, while a recurrent state may still hold it. Validation records carry ``task: passkey/<d/W>x``, so
InstructModule's per-task exact match (``val/accuracy/passkey/<r>x``) is the accuracy at each distance.

    python -m ivl.data.passkey --out data/passkey --tokenizer teachers/smollm2 --window 128

Distances are measured with the given tokenizer (the tokens between the end of the key's sentence and the
question) and stored in each record (``distance``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ivl.errors import UsageError

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INTRO = "There is a pass key hidden in the text below. Find it and remember it.\n"
QUESTION = "\nWhat is the pass key? Answer with the five digits only."
RATIOS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class Filler:
    """Filler text of a given length in tokens: whole repetitions of FILLER's sentences, cut at a word."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.words = (FILLER * 8).split(" ")
        self.per_word = len(self.tokens(FILLER * 8)) / len(self.words)

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, n_tokens: int) -> str:
        """Filler of about ``n_tokens`` tokens (at most a few tokens off; the exact count is measured)."""
        if n_tokens <= 0:
            return ""
        words = int(n_tokens / self.per_word)
        repeated = self.words * (words // len(self.words) + 1)
        text = " ".join(repeated[:words])
        while len(self.tokens(text)) < n_tokens:  # correct the estimate word by word
            words += 1
            repeated = self.words * (words // len(self.words) + 1)
            text = " ".join(repeated[:words])
        return text + " "


def record(filler: Filler, rng: random.Random, distance: int, before: int, task: str | None) -> dict:
    key = f"{rng.randrange(10_000, 100_000)}"
    after = filler.text(distance)
    prompt = INTRO + filler.text(before) + f"The pass key is {key}. Remember it. " + after + QUESTION
    out = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": key}],
           "distance": len(filler.tokens(after + QUESTION)) - len(filler.tokens(QUESTION))}
    if task is not None:
        out["task"] = task
    return out


def build(out: str | Path, tokenizer: str, window: int, train: int = 2000, per_distance: int = 200,
          ratios: tuple[float, ...] = RATIOS, train_max_ratio: float | None = None, seed: int = 0) -> dict:
    """Writes ``train.jsonl`` (distances uniform in [0, train_max_ratio x window], default the largest ratio)
    and ``val.jsonl`` (``per_distance`` records at each ratio x window); returns counts and mean distances."""
    if window < 1 or not ratios or min(ratios) <= 0:
        raise UsageError(f"need window >= 1 and positive distance ratios; got window {window}, ratios {ratios}")
    from transformers import AutoTokenizer

    filler = Filler(AutoTokenizer.from_pretrained(tokenizer))
    rng = random.Random(seed)
    top = int((train_max_ratio or max(ratios)) * window)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"train": train, "val": {}}
    with (out / "train.jsonl").open("w") as f:
        for _ in range(train):
            f.write(json.dumps(record(filler, rng, rng.randint(0, top), rng.randint(0, 64), None)) + "\n")
    with (out / "val.jsonl").open("w") as f:
        for ratio in ratios:
            task = f"passkey/{ratio:g}x"
            records = [record(filler, rng, int(ratio * window), rng.randint(0, 64), task)
                       for _ in range(per_distance)]
            stats["val"][task] = sum(r["distance"] for r in records) / len(records)
            f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "stats.json").write_text(json.dumps({**stats, "window": window, "tokenizer": str(tokenizer)}, indent=2))
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.data.passkey", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer files (the teacher's)")
    parser.add_argument("--window", type=int, default=256, help="the students' attention window, in tokens")
    parser.add_argument("--train", type=int, default=2000, help="training records")
    parser.add_argument("--per-distance", type=int, default=200, help="validation records per distance")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="distances / window")
    parser.add_argument("--train-max-ratio", type=float, help="longest training distance / window (default: max)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        stats = build(args.out, args.tokenizer, args.window, args.train, args.per_distance, tuple(args.ratios),
                      args.train_max_ratio, args.seed)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{args.out}: {stats['train']} training records; validation, mean distance in tokens: "
          + ", ".join(f"{task} {d:.0f}" for task, d in stats["val"].items()))


if __name__ == "__main__":
    main()
