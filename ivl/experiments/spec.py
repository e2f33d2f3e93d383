"""A sweep file, parsed and checked (its format: ``ivl.experiments.sweep``), and the grid points it expands to."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ivl.errors import UsageError

FIELDS = ("name", "base", "grid", "seeds", "overrides", "subcommand")
SUBCOMMANDS = ("fit", "validate", "test")


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    file: Path
    name: str
    base: Path
    grid: dict[str, list]
    seeds: list[int] | None
    overrides: dict[str, Any]
    subcommand: str = "fit"

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"sweep file {file} does not exist")
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{file}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{file}: a sweep file is a mapping with the fields {', '.join(FIELDS)}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise UsageError(f"{file}: unknown field {unknown[0]!r} (a sweep file has {', '.join(FIELDS)})")
        if not data.get("base"):
            raise UsageError(f"{file}: `base:` (the fit config every child starts from) is missing")
        grid = data.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise UsageError(f"{file}: `grid:` must map dotted config keys to lists of values; it is empty")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UsageError(f"{file}: grid key {key!r} must have a non-empty list of values; got {values!r}")
            if len(set(map(json.dumps, values))) != len(values):
                raise UsageError(f"{file}: grid key {key!r} repeats a value: {values}")
        seeds = data.get("seeds")
        if seeds is not None and (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            raise UsageError(f"{file}: `seeds:` must be a non-empty list of integers; got {seeds!r}")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise UsageError(f"{file}: `overrides:` must map dotted config keys to values; got {overrides!r}")
        subcommand = data.get("subcommand", "fit")
        if subcommand not in SUBCOMMANDS:
            raise UsageError(f"{file}: `subcommand:` must be one of {', '.join(SUBCOMMANDS)}; got {subcommand!r}")
        both = sorted(set(grid) & set(overrides))
        if both:
            raise UsageError(f"{file}: key {both[0]!r} is both in `grid:` and in `overrides:`")
        return cls(
            file=file,
            name=str(data.get("name") or file.stem),
            base=_find_base(file, str(data["base"])),
            grid=grid,
            seeds=seeds,
            overrides=overrides,
            subcommand=subcommand,
        )

    def children(self) -> list[Child]:
        keys = list(self.grid)
        points = itertools.product(*(self.grid[k] for k in keys))
        # Seeds outermost: a sweep cut short has covered the whole grid for its first seeds.
        return [
            Child(i, dict(zip(keys, values)), seed)
            for i, (seed, values) in enumerate(itertools.product(self.seeds or [None], list(points)))
        ]


def _find_base(file: Path, base: str) -> Path:
    for candidate in (file.parent / base, Path(base)):
        if candidate.is_file():
            return candidate
    raise UsageError(f"{file}: base config {base!r} not found (looked beside the sweep file and in {Path.cwd()})")


@dataclass
class Child:
    """One grid point (and seed): one fit, one MLflow child run."""

    index: int
    values: dict[str, Any]
    seed: int | None

    @property
    def name(self) -> str:
        parts = [f"{short(k)}={v}" for k, v in self.values.items()]
        return ",".join(parts + ([f"seed={self.seed}"] if self.seed is not None else []))

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-" + re.sub(r"[^A-Za-z0-9_.=,-]+", "_", self.name)


def short(key: str) -> str:
    """The last part of a dotted key: model.init_args.hybrid_ratio -> hybrid_ratio."""
    return key.rsplit(".", 1)[-1]
