"""python -m ivl.convert --teacher DIR --out DIR [--hybrid-ratio 0.25] [--linear-mixer gdn] [--window 8192]

Converts a local Qwen2.5-VL checkpoint into an InfiniteVL checkpoint folder: weights (config.json + safetensors),
the teacher's tokenizer and chat template (when the teacher folder has them), and conversion_report.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ivl.model.convert import LINEAR_INITS, convert_qwen2_5_vl
from ivl.model.mixers import ALIASES, LINEAR_MIXERS, MIXERS
from ivl.model.renames import warn_renamed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("--teacher", required=True, type=Path, help="Qwen2.5-VL checkpoint folder")
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


if __name__ == "__main__":
    main()
