"""Cheap activations recomputed in the backward of the blocks that activation checkpointing keeps.

A block whose activations are kept holds every tensor autograd saves in it. Several of the largest are outputs of
memory-bound functions of tensors that are saved anyway: the normalised inputs of the projections (kept by them
for their weight gradients), the SwiGLU product (kept by the down projection), the short convolution's outputs and
the l2-normalised q and k (kept by the Gated DeltaNet kernel and the norm), the gated norm's output (kept by the
output projection). Recomputing them instead of holding them shrinks what a kept block holds by a large part
(a Gated DeltaNet block most), so more blocks can be kept for the same memory (docs/benchmarks.md measures it).

A function marked ``@cheap`` (or an output passed to ``mark_recomputable``) names its inputs. Inside
``recording_cheap_activations()`` autograd keeps, for a saved tensor that shares such an output's storage, a
recipe instead: the function and its inputs (recipes themselves where they are such outputs). The backward
computes it again, once however many nodes saved it. This is torchtitan's selective checkpointing chosen by
function rather than by op: PyTorch's op-level policy (``create_selective_checkpoint_contexts``) runs inside a
checkpointed region, which re-runs the block's Triton kernels (fla's chunked forward) that it cannot see.
``recompute_cheap_activations(block)`` records for every forward of a module.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

_local = threading.local()  # saved-tensor hooks apply per thread, and so does recording


def cheap(fn: Callable) -> Callable:
    """Mark ``fn(*tensors_and_values) -> tensor`` as cheap to run again (elementwise or a norm over a row)."""

    @functools.wraps(fn)
    def run(*args):
        return mark_recomputable(fn(*args), fn, *args)

    return run


def mark_recomputable(out: torch.Tensor, fn: Callable, *args: Any) -> torch.Tensor:
    """Note that ``out`` is ``fn(*args)`` (deterministic, no autograd needed) while recording; returns ``out``."""
    recorders = _recorders()
    if recorders and torch.is_grad_enabled() and _hooks_on_top(recorders[-1]):
        recorders[-1].record(out, fn, args)
    return out


class recording_cheap_activations:
    """Context in which saved outputs of cheap functions are kept as recipes (see the module's docstring)."""

    def __enter__(self):
        self.recorder = _Recorder()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.recorder.pack, _unpack)
        self.hooks.__enter__()
        _recorders().append(self.recorder)
        return self

    def __exit__(self, *exc):
        _recorders().remove(self.recorder)
        self.recorder.outputs.clear()  # the recipes made so far keep what they need; the outputs may go
        return self.hooks.__exit__(*exc)


def recompute_cheap_activations(module: nn.Module) -> None:
    """Record cheap activations in every forward of ``module`` (a block whose activations are kept)."""
    contexts: list[recording_cheap_activations] = []

    def enter(*_):
        if torch.is_grad_enabled():
            contexts.append(recording_cheap_activations().__enter__())

    def leave(*_):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def _recorders() -> list[_Recorder]:
    if not hasattr(_local, "recorders"):
        _local.recorders = []
    return _local.recorders


def _hooks_on_top(recorder: _Recorder) -> bool:
    """Whether autograd saves through this recorder's hooks now, not through hooks entered inside the recording
    block (a checkpointed mixer's, in "mixers" mode): outputs noted there would only be held to no use."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # a private API (torch 2.8 on): without it, note everything, which costs
        return True  # memory only where checkpoints nest inside the block
    return hooks is not None and hooks[0] == recorder.pack


class _Recipe:
    """fn(*args), computed at most once (args: tensors, plain values or ``_View``s of other recipes), as the
    forward computed it: same autocast state, tensor inputs unchanged since, same dtype and layout out."""

    __slots__ = ("fn", "args", "versions", "autocast", "like", "value")

    def __init__(self, fn: Callable, args: list, versions: list, autocast: tuple, like: torch.Tensor):
        self.fn, self.args, self.versions, self.autocast, self.value = fn, args, versions, autocast, None
        self.like = (like.dtype, like.shape, like.stride())

    def compute(self) -> torch.Tensor:
        if self.value is None:
            for a, version in zip(self.args, self.versions):
                if version is not None and a._version != version:
                    raise RuntimeError(
                        f"an input of {_name(self.fn)} was modified in place after the forward: its "
                        "output, kept as a recipe (ivl.model.training.cheap_recompute), cannot be "
                        "recomputed"
                    )
            args = [a.compute() if isinstance(a, _View) else a for a in self.args]
            device_type, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                value = self.fn(*args)
            if (value.dtype, value.shape, value.stride()) != self.like:
                raise RuntimeError(
                    f"{_name(self.fn)} recomputed a {value.dtype} {tuple(value.shape)} tensor with "
                    f"strides {value.stride()}; the forward gave {self.like}"
                )
            self.value = value
        return self.value


class _View:
    """What autograd keeps for a saved tensor that lies in a recorded output's storage."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, t: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, t.size(), t.stride(), t.storage_offset()

    def compute(self) -> torch.Tensor:
        return self.recipe.compute().as_strided(self.size, self.stride, self.offset)


class _Recorder:
    def __init__(self):
        # storage address -> [output, fn, args, versions of the output and of the tensor args, autocast state,
        # recipe]. Holding the output keeps its address from being reused by another tensor while recording.
        self.outputs: dict[int, list] = {}

    def record(self, out: torch.Tensor, fn: Callable, args: tuple) -> None:
        # Only an output that owns its whole storage, laid out plainly (a recomputed one then has the same layout),
        # and is not an input itself (``contiguous`` of a contiguous tensor).
        storage = out.untyped_storage()
        if not (
            out.numel()
            and out.is_contiguous()
            and out.storage_offset() == 0
            and storage.nbytes() == out.numel() * out.element_size()
        ):
            return
        address = storage.data_ptr()
        if address in self.outputs or any(
            isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == address for a in args
        ):
            return
        device_type = out.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        versions = [out._version] + [a._version if isinstance(a, torch.Tensor) else None for a in args]
        self.outputs[address] = [out, fn, args, versions, (device_type, autocast), None]

    def pack(self, t: torch.Tensor) -> Any:
        if not self.outputs or type(t) is not torch.Tensor or not t.numel():
            return t
        entry = self.outputs.get(t.untyped_storage().data_ptr())
        if entry is None or entry[0].dtype != t.dtype or entry[0].device != t.device:
            return t
        out, fn, args, versions, autocast, recipe = entry
        # Changed in place since the function ran (the output, or an input): kept as it is. Views share their
        # base's version counter.
        if t._version != versions[0] or any(
            isinstance(a, torch.Tensor) and a._version != v for a, v in zip(args, versions[1:])
        ):
            return t
        if recipe is None:
            packed = [self.pack(a) if isinstance(a, torch.Tensor) else a for a in args]
            recipe = entry[5] = _Recipe(
                fn, packed, [None if isinstance(a, _View) else v for a, v in zip(packed, versions[1:])], autocast, out
            )
        return _View(recipe, t)


def _unpack(saved: Any) -> torch.Tensor:
    return saved.compute() if isinstance(saved, _View) else saved


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))
