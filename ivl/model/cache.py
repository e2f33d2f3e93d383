"""The hybrid inference cache: constant memory however long the input grows.

Attention layers keep at most ``window`` keys/values in a ring buffer (token t lives in slot t % window), so the
cache stops growing once the window is full. Constant-memory layers (Gated DeltaNet, Mamba2, GLA, linear
attention) keep one state and the last ``conv_size - 1`` inputs of each short convolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class WindowKVCache:
    """Keys/values of one attention layer, [B, S, Hkv, D], and the token index held in each slot, [S]."""

    window: int | None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    """[B, S]: False for padding tokens (left-padded batches), which no query may see."""
    length: int = 0
    """Tokens stored so far. Kept on the host, like ``all_valid``, so that a prefill chunk never waits for the
    GPU to learn the ring's size or whether it holds padding."""
    all_valid: bool = True
    """False once any update came with a mask (so may hold padding)."""

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Store new keys/values [B, T, Hkv, D] at token indices ``positions`` [T] (consecutive, following the
        tokens already stored); ``valid`` [B, T] marks real (non-padding) tokens, all of them when None."""
        B = keys.shape[0]
        if valid is None:
            valid = torch.ones(B, keys.shape[1], dtype=torch.bool, device=keys.device)
        else:
            self.all_valid = False  # a mask was given: assume padding rather than read it back from the GPU
        valid = valid.bool()
        if self.keys is None:
            self.keys, self.values, self.positions, self.valid = keys[:, :0], values[:, :0], positions[:0], valid[:, :0]
        if self.window is None:  # full attention: the cache grows with the input, by definition
            self.keys = torch.cat([self.keys, keys], dim=1)
            self.values = torch.cat([self.values, values], dim=1)
            self.positions = torch.cat([self.positions, positions])
            self.valid = torch.cat([self.valid, valid], dim=1)
            self.length += keys.shape[1]
            return
        self.length += keys.shape[1]  # positions run on from the tokens already stored
        size = min(self.length, self.window)
        if self.keys.shape[1] < size:  # still filling the window: grow to the slots the new tokens take
            grow = size - self.keys.shape[1]
            self.keys = torch.cat([self.keys, keys.new_zeros(B, grow, *keys.shape[2:])], dim=1)
            self.values = torch.cat([self.values, values.new_zeros(B, grow, *values.shape[2:])], 1)
            self.positions = torch.cat([self.positions, positions.new_full((grow,), -1)])
            self.valid = torch.cat([self.valid, valid.new_zeros(B, grow)], dim=1)
        keep = min(keys.shape[1], self.window)  # only the last `window` new tokens can ever be seen again
        slots = positions[-keep:] % self.window
        self.keys[:, slots] = keys[:, -keep:]
        self.values[:, slots] = values[:, -keep:]
        self.positions[slots] = positions[-keep:]
        self.valid[:, slots] = valid[:, -keep:]

    def clone(self, copy) -> WindowKVCache:
        """A copy whose per-row tensors are ``copy(t)`` (e.g. a row selection); slot positions are shared by rows."""
        return WindowKVCache(
            self.window,
            *(copy(t) if t is not None else None for t in (self.keys, self.values)),
            self.positions.clone() if self.positions is not None else None,
            copy(self.valid) if self.valid is not None else None,
            self.length,
            self.all_valid,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.positions, self.valid) if t is not None]


@dataclass
class RecurrentCache:
    """State of one constant-memory layer (Gated DeltaNet's [B, H, K, V], float32; each linear mixer says its
    shape) and its short-convolution tails by name, [B, W-1, C]."""

    state: torch.Tensor | None = None
    conv: dict[str, torch.Tensor] = field(default_factory=dict)

    def clone(self, copy) -> RecurrentCache:
        return RecurrentCache(
            copy(self.state) if self.state is not None else None, {k: copy(v) for k, v in self.conv.items()}
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.state, *self.conv.values()) if t is not None]


class HybridCache:
    """One entry per layer (each mixer's ``new_cache``) plus the number of tokens seen so far (the next token's
    index)."""

    def __init__(self, layers: list):
        self.layers = list(layers)
        self.seen_tokens = 0

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def select_rows(self, rows: torch.Tensor) -> HybridCache:
        """A cache holding only batch rows ``rows`` (a LongTensor of indices, in the order given): finished or
        abandoned requests leave a batch without touching the others' state."""
        return self.clone(lambda t: t.index_select(0, rows))

    def clone(self, rows=None) -> HybridCache:
        """An independent copy (``rows``: a function applied to each per-row tensor, e.g. selecting rows): a
        snapshot to answer a question from without advancing the stream it was taken from."""
        out = HybridCache([layer.clone((lambda t: t.clone()) if rows is None else rows) for layer in self.layers])
        out.seen_tokens = self.seen_tokens
        return out

    def nbytes(self) -> int:
        """Bytes held by every cached tensor."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
