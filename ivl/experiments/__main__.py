"""python -m ivl.experiments {fit,validate,test,predict} --config experiments/X.yaml [--key value ...]

python -m ivl.experiments sweep --config experiments/SWEEP.yaml [--parallel N [--per-gpu K]] [--key value ...]
"""

import sys

from ivl.cpu_threads import fit_threads_to_cpus
from ivl.cuda_allocator import expandable_segments


def main() -> None:
    if sys.argv[1:2] == ["sweep"]:  # a sweep runs each child through the CLI in its own process
        from ivl.experiments.sweep import main as sweep

        fit_threads_to_cpus()  # once here, inherited by the children
        expandable_segments()
        raise SystemExit(sweep(sys.argv[2:]))
    from ivl.experiments.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
