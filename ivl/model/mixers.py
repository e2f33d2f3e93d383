"""Layer type -> token mixer. Add a linear mixer (fla's Mamba2, GLA, ...) here for the ablations."""

from ivl.model.attention import SlidingWindowAttention
from ivl.model.gated_deltanet import GatedDeltaNet

MIXERS = {
    "attention": SlidingWindowAttention,
    "gated_deltanet": GatedDeltaNet,
}
