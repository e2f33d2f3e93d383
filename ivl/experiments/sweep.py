"""``python -m ivl.experiments sweep --config SWEEP.yaml [--key=value ...]``: a grid of fits as MLflow child runs.

A sweep file::

    name: hybrid-ratio                     # optional; default: the file's name without .yaml
    base: demo.yaml                        # a fit config, relative to this file or to the working directory
    grid:                                  # dotted config keys -> lists of values; several keys: every combination
      model.init_args.hybrid_ratio: [0.0, 0.25, 0.5, 1.0]
    seeds: [0, 1]                          # optional: each grid point once per seed (seed_everything)
    overrides:                             # optional: dotted keys -> one value, for every child
      trainer.max_epochs: 2
    subcommand: fit                        # optional: fit (default), validate or test

Every child is a complete ``fit`` in its own process (a failure or an out-of-memory error stays in that child),
with its own folder ``<base default_root_dir>/sweeps/<name>/<NN-child>`` holding its config, log, checkpoints and
exported model, and its own MLflow run nested under one parent run per sweep. Arguments after the sweep file apply
to every child as they would to ``fit``. Rerun with the same file, a sweep reuses its parent run, skips finished
children and resumes an unfinished one from its newest checkpoint that reads completely. At the end the parent
gets the summary: a table of each child's grid values and metrics (``summary.csv``, ``summary.md``) and a plot
of the monitored metric against each swept key (``summary.png``, seeds as error bars).

Hand-written because no kept library does this over LightningCLI configs with MLflow nesting: Lightning's own
sweeps live in its cloud product, and Optuna or Ray Tune would own the loop and the process model.

This module is the command line; the sweep file is read in ``spec``, the children's configs are built in
``child_configs``, their MLflow runs kept in ``tracking``, the children run by ``runner``, and ``summary`` and
``plots`` write what the parent run shows at the end.
"""

from __future__ import annotations

import argparse
import sys

from ivl.errors import UsageError
from ivl.experiments.runner import run


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivl.experiments sweep",
        description="Runs a grid of fits as MLflow child runs of one parent run (see ivl/experiments/sweep.py).",
        epilog="Arguments after the sweep file (e.g. --trainer.max_steps=2) apply to every child as in fit.",
    )
    parser.add_argument("--config", required=True, help="the sweep file (YAML: base, grid, seeds, overrides, name)")
    parser.add_argument("--parallel", type=int, default=1, help="children at once, one per GPU (default 1)")
    parser.add_argument(
        "--per-gpu",
        type=int,
        default=1,
        help="children sharing one GPU when --parallel runs several (default 1): for models too small to fill a GPU",
    )
    known, extra = parser.parse_known_args(args)
    try:
        failed = run(known.config, extra, known.parallel, known.per_gpu)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if failed:
        print(f"[sweep] {failed} children failed", file=sys.stderr)
    return 1 if failed else 0
