"""Training at scale, applied to the plain model from outside: activation checkpointing per block, FSDP2 sharding
per block, and moving full state dicts in and out of a sharded model.

The order follows torchtitan's ``parallelize``: checkpointing first, then ``fully_shard`` on each block, on the
vision tower as one unit, and on the whole model last (the root holds the embeddings, the final norm and the tied
LM head, which must share a unit). ``ivl/model`` never imports torch.distributed; the stages call these.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ivl.model.training.cheap_recompute import recompute_cheap_activations
from ivl.stages.checkpoints import replace_folder

CHECKPOINTING = ("off", "blocks", "mixers")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: one data-parallel group over every process, no tensor
    parallelism, so that ``devices: auto`` needs no matching ``data_parallel_size``. The stage's
    ``configure_model`` shards the model; checkpoints are distributed (DCP) folders that resume on any number of
    processes."""

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A distributed checkpoint is written into a temporary folder beside its name and renamed when every
        rank has finished, so that a kill leaves the previous checkpoint whole (``ivl.stages.checkpoints``)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        written = Path(self.broadcast(str(path.parent / f".{path.name}.tmp-{os.getpid()}")))
        super().save_checkpoint(checkpoint, written, storage_options)
        self.barrier("checkpoint written")
        if self.global_rank == 0:
            replace_folder(written, path)
        self.barrier("checkpoint in place")


def checkpoint_blocks(lm: nn.Module, mode: str | int | float | None, recompute_cheap: bool = True) -> list[int]:
    """Activation checkpointing (recompute in backward instead of keeping activations), per block of ``lm``.

    ``mode``: "off" (or None), "blocks" (every block), "mixers" (only each block's token mixer: attention's and
    Gated DeltaNet's activations are recomputed, the MLPs' kept), an int n (every n-th block: 0, n, 2n, ...) or
    a float f in (0, 1) (that share of the blocks, for memory left over when every block is checkpointed: 0.75
    recomputes 27 of 36 blocks and keeps the other nine's activations). The kept blocks are attention blocks
    first: a Gated DeltaNet block keeps more activations (its q, k and v before and after the convolution, the
    normalised q and k, the gates, fla's chunk matrices) for a forward of about the same time, so for the same
    memory more attention blocks than Gated DeltaNet ones can be kept (docs/benchmarks.md measures both orders).
    Kept blocks of each kind are spread evenly.
    Applied with PyTorch's composable ``checkpoint``, so parameter names, checkpoints and LoRA are unchanged.
    With ``recompute_cheap`` (and checkpointing on), the blocks whose activations are kept recompute their cheap
    ones (norm outputs, the SwiGLU product, convolution outputs) in the backward instead
    (``ivl.model.training.cheap_recompute``). Returns the indices of the blocks it checkpointed.
    """
    chosen = checkpointed_blocks(len(lm.layers), mode, keep_first=lm.config.attention_layers)
    for i in chosen:
        checkpoint(lm.layers[i].mixer if mode == "mixers" else lm.layers[i])
    if recompute_cheap and chosen:
        for i, block in enumerate(lm.layers):
            if i not in chosen or mode == "mixers":
                recompute_cheap_activations(block)
    return chosen


def checkpointed_blocks(count: int, mode: str | int | float | None, keep_first: list[int] | None = None) -> list[int]:
    """The indices of the blocks, out of ``count``, that ``mode`` (see ``checkpoint_blocks``) recomputes. With a
    share, the kept blocks come from ``keep_first`` before the others, each group's spread evenly."""
    if mode is None or mode == "off":
        return []
    if mode in CHECKPOINTING:
        return list(range(count))
    if isinstance(mode, int) and not isinstance(mode, bool) and mode >= 1:
        return list(range(0, count, mode))
    if isinstance(mode, float) and 0 < mode < 1:
        # block i is chosen where the running count i * mode passes a whole number: floor(count * mode) blocks,
        # evenly spaced
        recomputed = [i for i in range(count) if math.floor((i + 1) * mode) > math.floor(i * mode)]
        first = sorted(set(keep_first or ()) & set(range(count)))
        if not first or len(first) == count:
            return recomputed
        keep = count - len(recomputed)
        others = [i for i in range(count) if i not in first]
        kept = set(_spread(first, keep) if keep <= len(first) else first + _spread(others, keep - len(first)))
        return [i for i in range(count) if i not in kept]
    raise ValueError(
        f"activation_checkpointing must be one of {CHECKPOINTING}, a block stride n >= 1 (every n-th "
        f"block) or a share of the blocks in (0, 1); got {mode!r}"
    )


def _spread(items: list[int], k: int) -> list[int]:
    """k of ``items``, evenly spaced: item j is taken where the running count j * k / len passes a whole number."""
    n = len(items)
    return [item for j, item in enumerate(items) if (j + 1) * k // n > j * k // n]


def store_frozen_in(model: nn.Module, dtype: torch.dtype, keep=()) -> list[str]:
    """Store every parameter that does not train in ``dtype`` (FSDP2's compute dtype), before sharding.

    A frozen parameter needs no float32 master copy: nothing updates it, and FSDP2 rounds it to ``dtype`` for
    every forward and backward anyway, so the computation is bit for bit the same. Stored once in bf16, it takes
    half the memory of a float32 copy (most of the model, in a LoRA stage) and each gathering reads
    half the bytes. Trainable parameters keep their dtype (FSDP2 wants one dtype among them), and so do the
    parameters in ``keep``: frozen now but trained later in the fit (``LayerFreezing``'s unfreeze schedule). Call
    it once the trainable set is final for the whole fit (Stage I's holds both phases' parameters). Returns the
    names moved. A stage's export then holds these weights as the bf16 values the fit computed with (in float32):
    the low bits of a float32 checkpoint loaded as frozen (Stage II's trained weights under Stage III's LoRA) are
    not carried through.
    """
    kept = {id(p) for p in keep}
    moved = []
    for name, p in model.named_parameters():
        if not p.requires_grad and id(p) not in kept and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            moved.append(name)
    return moved


def shard(
    model: nn.Module,
    mesh,
    param_dtype: torch.dtype = torch.bfloat16,
    forward_methods: tuple[str, ...] = (),
    reshard_after_forward: bool = True,
) -> None:
    """``fully_shard`` each LM block, the vision tower (one unit) and the model (the root): parameters stay float32
    and sharded, each unit is gathered in ``param_dtype`` for its forward and backward, and gradients are
    reduce-scattered in float32. ``forward_methods`` are methods of the root that run as forwards (so that they
    gather the root's parameters: the embeddings and the tied head). ``reshard_after_forward`` False keeps each
    unit gathered from its forward to its backward (no second all-gather, one gathered copy of the model)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.lm.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model.visual, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor] | None, tied: dict[str, str]) -> None:
    """Fill a sharded model from a full state dict that only rank 0 holds (``state`` None elsewhere): rank 0
    broadcasts tensor by tensor and each rank keeps its shard, so no rank holds a second full copy.

    ``tied``: {second name: first name} of tied parameters, filled from the first. Missing names (fresh LoRA
    adapters) keep their values; names the model does not have are an error.
    """
    if state is not None:
        state = dict(state)
        for second, first in tied.items():
            if second not in state and first in state:
                state[second] = state[first]
        unknown = sorted(set(state) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{len(unknown)} tensors do not belong to this model, e.g. {unknown[:5]}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state or {}, options=options)


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU, gathered one unit at a time; {} on the other ranks."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
