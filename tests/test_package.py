"""The package imports from any working directory, the repository root included."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_repository_root_folders_do_not_pose_as_other_packages():
    """From the repository root, kernels/ and callbacks/ are importable as top-level modules (Python puts the
    working directory first): transformers' probe for the Hugging Face ``kernels`` package imports it, and must see
    an empty module, not an error, while ivl.kernels still works."""
    code = ("import kernels, callbacks; assert not hasattr(kernels, 'gated_delta_rule'), kernels; "
            "from transformers.utils.import_utils import is_kernels_available; assert not is_kernels_available(); "
            "import ivl.kernels, ivl.callbacks, ivl.model; print(ivl.kernels.gated_delta_rule.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "gated_delta_rule"
