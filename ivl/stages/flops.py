"""Model FLOPs of training and evaluation steps, counted from the model's shapes: the benchmark's MFU and the
``flops_per_batch`` that Lightning's ThroughputMonitor reads from the stage modules.

Recomputation is excluded. Forward: 2 N_run + the mixers' cores; backward: 2 N_run (input gradients through every
product that ran) + 2 N_trainable (weight gradients) + twice the cores' forward. N are matrix parameters (the tied
head counted once, as the head); the cores (attention over its keys, a linear mixer's state and chunk products,
short convolutions) are each mixer's own ``core_flops_per_token``, so every mixer is counted by its own formula. The
vision tower is not counted.

Here, beside the stages, because they report it (``StageModule.flops_per_batch``); ``ivl.bench train`` reads the
same counts for its MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ivl.kernels.packed_bounds import host_bounds
from ivl.model.mixers.attention import mean_keys_seen


@dataclass
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def matrix_params(module: nn.Module, trainable: bool | None = None) -> int:
    """Parameters of the matrices (2-D weights) in ``module``, optionally only the (non-)trainable ones."""
    return sum(
        p.numel() for p in module.parameters() if p.dim() == 2 and (trainable is None or p.requires_grad == trainable)
    )


def sequence_lengths(batch: dict) -> list[int]:
    """Tokens of each sequence of a batch: packed (``cu_seqlens``), padded (the attention mask) or full rows.
    On a GPU this reads the batch back from the device: call it where the host waits anyway."""
    if batch.get("cu_seqlens") is not None:
        bounds = host_bounds(batch["cu_seqlens"])
        return [end - start for start, end in zip(bounds, bounds[1:])]
    mask = batch.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(-1).tolist()]
    rows, length = batch["input_ids"].shape
    return [length] * rows


def hybrid_batch_flops(model, lengths: list[int], blocks: list[int] | None = None, head: bool = True) -> Flops:
    """Over sequences of ``lengths`` tokens, for the InfiniteVL language model (``blocks``: only these blocks run,
    without embeddings or head: the layer-wise phase)."""
    text = model.config.text
    blocks = range(text.num_layers) if blocks is None else blocks
    run = sum(matrix_params(model.lm.layers[i]) for i in blocks)
    trained = sum(matrix_params(model.lm.layers[i], trainable=True) for i in blocks)
    if head:
        run += model.lm.lm_head.weight.numel()
        trained += model.lm.lm_head.weight.numel() if model.lm.lm_head.weight.requires_grad else 0
    core = 0.0
    for length in lengths:  # attention's core grows with each sequence's own length
        core += length * sum(model.lm.layers[i].mixer.core_flops_per_token(length) for i in blocks)
    tokens = sum(lengths)
    return Flops(2 * run * tokens + core, (2 * run + 2 * trained) * tokens + 2 * core)


def hybrid_flops(model, length: int, blocks: list[int] | None = None, head: bool = True) -> Flops:
    """Per token of a ``length``-token sequence, for the InfiniteVL language model (see ``hybrid_batch_flops``)."""
    flops = hybrid_batch_flops(model, [length], blocks, head)
    return Flops(flops.forward / length, flops.backward / length)


def transformer_batch_flops(lm, lengths: list[int], trained: bool = True) -> Flops:
    """Over sequences of ``lengths`` tokens, for a transformers Qwen2 causal LM or Qwen2.5-VL (``trained`` False:
    forward only, e.g. the teacher)."""
    config = lm.config
    config = getattr(config, "text_config", config)
    layers = lm.model.language_model.layers if hasattr(lm.model, "language_model") else lm.model.layers
    run = sum(matrix_params(layer) for layer in layers) + lm.lm_head.weight.numel()
    head_dim = config.hidden_size // config.num_attention_heads
    per_context = config.num_hidden_layers * 4 * config.num_attention_heads * head_dim
    core = sum(length * per_context * mean_keys_seen(length, None) for length in lengths)
    tokens = sum(lengths)
    if not trained:
        return Flops(2 * run * tokens + core, 0.0)
    weight_grads = sum(matrix_params(layer, trainable=True) for layer in layers)
    weight_grads += lm.lm_head.weight.numel() if lm.lm_head.weight.requires_grad else 0
    return Flops(2 * run * tokens + core, (2 * run + 2 * weight_grads) * tokens + 2 * core)


def transformer_flops(lm, length: int, trained: bool = True) -> Flops:
    """Per token of a ``length``-token sequence, for a transformers causal LM (see ``transformer_batch_flops``)."""
    flops = transformer_batch_flops(lm, [length], trained)
    return Flops(flops.forward / length, flops.backward / length)
