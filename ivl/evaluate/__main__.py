"""`python -m ivl.evaluate --model DIR --data FILE.tsv [...]`: score a checkpoint on VLMEvalKit-format benchmarks.

Writes, per benchmark (and per frame count for video benchmarks), ``<out>/<benchmark>/predictions.jsonl`` and
``scores.json``; logs the scores to MLflow; prints a table. A killed run resumes from its predictions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ivl.cpu_threads import fit_threads_to_cpus
from ivl.errors import UsageError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ivl.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a saved InfiniteVL folder")
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="VLMEvalKit TSV files")
    parser.add_argument(
        "--metric",
        default="auto",
        choices=["auto", "mcq", "vqa", "anls", "relaxed", "exact", "yes_no", "ocrbench", "mathvista"],
        help="per-question score; auto: the benchmark's, by its file name as VLMEvalKit names it "
        "(MMBench, MME, DocVQA, ChartQA, ...), else multiple choice when there are options, VQA "
        "accuracy when references are lists, else exact match",
    )
    parser.add_argument(
        "--circular",
        action="store_true",
        help="multiple choice in a file without circular copies: ask every rotation of the options, "
        "right only if all are right (MMBench's files hold their copies: circular already)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each file")
    parser.add_argument(
        "--frames",
        type=int,
        nargs="+",
        default=None,
        help="video benchmarks: frames sampled per video (several values: one run each, and a "
        "plot of score against frames)",
    )
    parser.add_argument("--media-root", type=Path, default=None, help="where `video` and relative image paths live")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable rows (counted in scores.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--mlflow",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db"),
        help="MLflow tracking URI ('' to skip logging)",
    )
    parser.add_argument("--experiment", default="ivl-eval")
    args = parser.parse_args(argv)
    for path in args.data:
        if not path.is_file():
            parser.error(f"--data {path}: no such file")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a saved InfiniteVL folder (no config.json)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    fit_threads_to_cpus()
    from ivl.evaluate.runner import Options, evaluate_file, log_mlflow, model_identity, table
    from ivl.evaluate.tsv import BadRow
    from ivl.serve.engine import ChatEngine
    from ivl.serve.loading import load

    model, processor, name = load(args.model, args.device, args.dtype)
    engine = ChatEngine(model, processor, capacity=args.batch_size)
    results = []
    try:
        for path in args.data:
            for frames in args.frames or [None]:
                options = Options(
                    metric=args.metric,
                    batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens,
                    limit=args.limit,
                    circular=args.circular,
                    frames=frames,
                    media_root=args.media_root,
                    skip_bad=args.skip_bad,
                )
                out = args.out / path.stem / (f"{frames}frames" if frames else "")
                results.append(evaluate_file(engine, path, out, options, model_identity(args.model)))
    except (BadRow, ValueError, FileNotFoundError, UsageError) as error:
        sys.exit(f"error: {error}")
    print(table(results))
    if args.frames and len(args.frames) > 1:
        from ivl.evaluate.plots import score_against_frames

        print(f"plot: {score_against_frames(results, args.out / 'frames.png')}")
    if args.mlflow:
        run = log_mlflow(
            results,
            args.mlflow,
            args.experiment,
            f"eval {name}",
            {
                "model": args.model,
                "metric": args.metric,
                "circular": args.circular,
                "max_new_tokens": args.max_new_tokens,
                "limit": args.limit,
            },
        )
        print(f"MLflow run {run} ({args.mlflow})")


if __name__ == "__main__":
    main()
