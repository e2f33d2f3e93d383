"""The CUDA caching allocator's setting for training and benchmark runs: expandable segments.

A training step allocates and frees tensors of many sizes: kept blocks of two kinds with different activations,
recomputed blocks, FSDP2's gathered units and gradient buffers, the chunked losses. With fixed-size
segments the freed gaps fragment the cache, and a step that needs a few GiB more than it allocates runs out of
memory at 80 GiB. Expandable segments grow one mapping per stream instead (torchtitan's launch script sets the
same). The training benchmarks in docs/benchmarks.md run with it.
"""

from __future__ import annotations

import os

SETTING = "PYTORCH_CUDA_ALLOC_CONF"


def expandable_segments() -> bool:
    """Turn on expandable segments unless the user configured the allocator. Must run before CUDA initialises in
    this process; processes it starts (Lightning's other ranks) inherit it. Returns whether it set anything."""
    if os.environ.get(SETTING):
        return False
    os.environ[SETTING] = "expandable_segments:True"
    return True
