"""python -m ivl.convert --teacher DIR --out DIR [--hybrid-ratio 0.25] [--linear-mixer gdn] [--window 8192]
python -m ivl.convert --from-release DIR --out DIR | --to-release IVL_DIR --out DIR

Converts a local Qwen2.5-VL checkpoint into an InfiniteVL checkpoint folder: weights (config.json + safetensors),
the teacher's tokenizer and chat template (when the teacher folder has them), and conversion_report.json. Or reads
a checkpoint in the public InfiniteVL release's format (hustvl/InfiniteVL) into an ivl folder, or writes an ivl
folder in that format (``ivl.model.release``: the same tensors under other names).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from ivl.model.convert import LINEAR_INITS, convert_qwen2_5_vl
from ivl.model.mixers import ALIASES, LINEAR_MIXERS, MIXERS
from ivl.model.release import from_release, to_release
from ivl.model.renames import warn_renamed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.convert", description=__doc__.split("\n\n")[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", type=Path, help="Qwen2.5-VL checkpoint folder")
    source.add_argument(
        "--from-release",
        type=Path,
        metavar="DIR",
        help="a checkpoint in the public InfiniteVL release's format, to read into an ivl folder",
    )
    source.add_argument(
        "--to-release",
        type=Path,
        metavar="IVL_DIR",
        help="an ivl checkpoint folder, to write in the public InfiniteVL release's format",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write the InfiniteVL checkpoint to")
    parser.add_argument("--hybrid-ratio", type=float, default=0.25, help="fraction of layers kept as attention")
    parser.add_argument(
        "--layer-types", help=f"comma-separated per-layer mixers ({', '.join(MIXERS)}); overrides --hybrid-ratio"
    )
    parser.add_argument(
        "--linear-mixer",
        default="gated_deltanet",
        choices=[*LINEAR_MIXERS, *ALIASES],
        help="the mixer of the replaced layers (the paper's mixer ablation); default gated_deltanet",
    )
    parser.add_argument("--window", type=int, default=8192, help="sliding window; 0 for full attention")
    parser.add_argument(
        "--linear-init",
        choices=LINEAR_INITS,
        default="mimic",
        help="how the linear mixers start: mimic (a near pass-through) or attention (q/k copied)",
    )
    parser.add_argument("--gdn-init", choices=LINEAR_INITS, help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the teacher's")
    args = parser.parse_args(argv)
    if args.teacher is None:
        release_mode(parser, args)
        return
    if args.gdn_init is not None:
        warn_renamed("gdn_init", "--gdn-init", stacklevel=2)
        args.linear_init = args.gdn_init
    if not (args.teacher / "config.json").exists():
        parser.error(
            f"--teacher {args.teacher}: no config.json there (a local Qwen2.5-VL checkpoint folder is "
            "expected; nothing is downloaded)"
        )

    layer_types = args.layer_types.split(",") if args.layer_types else None
    try:
        model, report = convert_qwen2_5_vl(
            args.teacher,
            hybrid_ratio=args.hybrid_ratio,
            window=args.window or None,
            layer_types=layer_types,
            linear_init=args.linear_init,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            linear_mixer=args.linear_mixer,
        )
    except ValueError as err:  # a setting the teacher or the mixer rejects: a usage error, not a traceback
        parser.error(str(err))
    model.save_pretrained(args.out)  # with the teacher's tokenizer and processor files when it has them
    (args.out / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(report)
    print(f"wrote {args.out}")


def release_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--from-release / --to-release: a rename of every tensor, no training or teacher options involved."""
    teacher_only = [
        f"--{name.replace('_', '-')}"
        for name in ("hybrid_ratio", "layer_types", "linear_mixer", "window", "linear_init", "gdn_init", "dtype")
        if getattr(args, name) != parser.get_default(name)
    ]
    if teacher_only:
        parser.error(f"{', '.join(teacher_only)}: only with --teacher (a release checkpoint converts as it is)")
    source, convert = (args.from_release, from_release) if args.from_release else (args.to_release, to_release)
    flag = "--from-release" if args.from_release else "--to-release"
    if not (source / "config.json").exists():
        parser.error(f"{flag} {source}: no config.json there (a local checkpoint folder is expected)")
    try:
        written = convert(source, args.out)
    except (ValueError, OSError, SafetensorError) as err:  # what cannot be read or mapped, named by file and field
        parser.error(str(err))
    print(f"wrote {args.out}: {', '.join(written)}")


if __name__ == "__main__":
    main()
