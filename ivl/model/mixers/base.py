"""The contract every token mixer implements: ``TokenMixer``, and ``RecurrentMixer`` for the constant-memory ones.

The language model, the caches, the projection packing, the static decoder, the conversion and the benchmarks
call a mixer through these methods and never test its class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn as nn

from ivl.kernels.packed_bounds import FLA_CHUNK
from ivl.model.cache import RecurrentCache

if TYPE_CHECKING:
    from ivl.model.config import HybridConfig

StepFunction = Callable[..., torch.Tensor]


class DecodeMatrix(NamedTuple):
    """A weight matrix that a decode step multiplies each row's token by, as the step reads it (a group of
    projections packed into one matrix is one): ``rows`` x ``cols``."""

    name: str
    rows: int
    cols: int


class TokenMixer(nn.Module):
    """What every token mixer provides.

    Forward (training, prefill, chunked prefill, decoding through the dynamic cache):
        ``forward(x, rope, cu_seqlens, cache, token_index, attention_mask)``: x [B, T, hidden] -> [B, T, hidden];
        packed sequences (``cu_seqlens``, B = 1) never mix; left padding (``attention_mask`` 0) leaves no trace
        in what the row's real tokens see; with a cache entry from ``new_cache`` the call continues its stream and
        extends it. Every forward starts with ``guard``.
    Fixed-shape decoding (the static cache and the CUDA-graph decoder):
        ``static_buffers`` allocates the buffers of one layer at their final shape, ``load_static`` copies a
        dynamic cache entry into them, and ``step`` (a pure function over tensors, compiled into one graph per
        block on CUDA) advances them by one token in place. ``step_weights`` and ``step_sizes`` are its inputs.
    Packing: ``projection_groups`` names the weights that read the same input, to be stored as one matrix.
    Initialisation: ``reset_mimic`` after the model's generic initialisation (InfiniteVL's near pass-through for
    the linear mixers); ``from_attention`` maps parameters that conversion may copy from the attention layer
    being replaced (``linear_init="attention"``), to the teacher's attention parameter names.
    Cost (the benchmarks' FLOP model and GEMV shapes): ``flops_per_token`` and ``core_flops_per_token`` of the
    forward, ``decode_matrices`` of a decode step.
    """

    label: ClassVar[str]
    """The mixer's name in tables and benchmark output."""
    from_attention: ClassVar[dict[str, str]] = {}
    step: ClassVar[StepFunction]
    """step(x [B, 1, hidden] normed, weights, buffers, cos, sin, token_index, sizes) -> [B, 1, hidden]."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def guard(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The checks every forward starts with; returns the x to mix. A cache entry continues one stream per batch
        row, and packed sequences share one row."""
        if cache is not None and cu_seqlens is not None:
            raise ValueError("a cache holds one stream per batch row; pass padded batches, not cu_seqlens")
        return x

    def new_cache(self, window: int | None):
        raise NotImplementedError

    def static_buffers(self, batch: int, window: int, device, dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_static(self, buffers: dict[str, torch.Tensor], entry, shift: int = 0) -> None:
        """Copy a dynamic cache entry into the buffers; ``shift``: the first ``shift`` token indices were left
        padding, and the row's tokens count from its first real one (only token-indexed buffers change)."""
        raise NotImplementedError

    def projection_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def step_weights(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_sizes(self) -> NamedTuple:
        """The sizes ``step`` reads, as this mixer's NamedTuple of Python numbers: hashable, so the compiled step
        takes them as constants (one graph per distinct value) instead of tensors."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_mimic(self) -> None:
        """Nothing to do by default: the model's normal initialisation stands."""

    # ---- cost, for the benchmarks' FLOP model and GEMV shapes ----------------------------------------------------
    def decode_matrices(self) -> list[DecodeMatrix]:
        """Every weight matrix one decode step multiplies a row's token by, packed as ``step`` reads them (biases,
        caches and states are not weights: attention's product with its cached keys is not listed)."""
        raise NotImplementedError

    def core_flops_per_token(self, length: int, chunk: int = FLA_CHUNK) -> float:
        """Forward FLOPs per token of the token mixing beyond the weight products (attention over its keys, a
        linear mixer's state and chunk products, short convolutions), in sequences of ``length`` tokens; the
        linear mixers' chunked kernels work in chunks of ``chunk`` tokens. Elementwise work is not counted."""
        raise NotImplementedError

    def flops_per_token(self, length: int, chunk: int = FLA_CHUNK) -> float:
        """Forward FLOPs per token: two per weight of the matrices a token is multiplied by, plus the core."""
        return 2 * sum(m.rows * m.cols for m in self.decode_matrices()) + self.core_flops_per_token(length, chunk)


class RecurrentMixer(TokenMixer):
    """A constant-memory mixer: per row, one float32 state and the tails of its short convolutions (if any),
    cached as a ``RecurrentCache`` (``conv`` keyed by ``conv_names``) and, for fixed-shape decoding, as a
    "state" buffer and one "tail" buffer holding the convolutions' channels side by side in that order."""

    conv_names: ClassVar[tuple[str, ...]] = ()

    def guard(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Also: padding tokens (attention_mask 0) enter as zeros, so they write nothing to the state and reach no
        later token's convolution, and a left-padded row ends in the state its prompt gives."""
        x = super().guard(x, cu_seqlens, cache, attention_mask)
        if attention_mask is not None:
            x = x.masked_fill(~attention_mask[..., None].bool(), 0)  # not x * mask: NaN * 0 is NaN
        return x

    def state_shape(self) -> tuple[int, ...]:
        """Per-row shape of the state (e.g. [H, K, V])."""
        raise NotImplementedError

    def conv_layout(self) -> tuple[int, list[int]]:
        """(kernel width, channels of each convolution in ``conv_names``)."""
        raise NotImplementedError

    def new_cache(self, window: int | None) -> RecurrentCache:
        return RecurrentCache()

    def static_buffers(self, batch: int, window: int, device, dtype) -> dict[str, torch.Tensor]:
        buffers = {"state": torch.zeros(batch, *self.state_shape(), device=device)}
        if self.conv_names:
            width, channels = self.conv_layout()
            buffers["tail"] = torch.zeros(batch, width - 1, sum(channels), device=device, dtype=dtype)
        return buffers

    def load_static(self, buffers: dict[str, torch.Tensor], entry, shift: int = 0) -> None:
        if entry.state is None:  # nothing cached yet: the buffers' zeros are the empty stream
            return
        buffers["state"].copy_(entry.state)
        if self.conv_names:
            buffers["tail"].copy_(torch.cat([entry.conv[name] for name in self.conv_names], dim=-1))
