"""Token-mixing kernels: CPU references in PyTorch, GPU fast paths (fla, flash-attn, FlexAttention)."""

from ivl.kernels.gated_delta import gated_delta_rule
from ivl.kernels.window_attention import sliding_window_attention

__all__ = ["gated_delta_rule", "sliding_window_attention"]
