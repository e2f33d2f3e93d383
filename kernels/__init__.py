"""Token-mixing kernels: CPU references in PyTorch, GPU fast paths (fla, flash-attn, FlexAttention)."""

# Only as ``ivl.kernels``. Run from the repository root, a probe for another package of this name (transformers
# imports the Hugging Face ``kernels`` package to read its version) finds this folder as a top-level module: it
# must get an empty one, not an error or a second copy of ivl's kernels.
if __name__.startswith("ivl."):
    from ivl.kernels.gated_delta import gated_delta_rule
    from ivl.kernels.gated_linear import gated_linear_attention
    from ivl.kernels.window_attention import sliding_window_attention

    __all__ = ["gated_delta_rule", "gated_linear_attention", "sliding_window_attention"]
