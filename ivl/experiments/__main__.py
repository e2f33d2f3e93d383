"""python -m ivl.experiments {fit,validate,test,predict} --config experiments/X.yaml [--key value ...]

python -m ivl.experiments sweep --config experiments/SWEEP.yaml [--parallel N [--per-gpu K]] [--key value ...]
"""

from ivl.experiments.cli import main

if __name__ == "__main__":
    main()
