"""Prefill chunks replayed from CUDA graphs.

A long prompt (or a video stream) is prefilled in chunks of one length. Once every attention ring is full (after
the first ``window`` tokens), each further chunk runs the same kernels on tensors of the same shapes: only values
change, so the chunk can be captured once and replayed, launched as one graph instead of some 1,600 kernels.
Whether that pays depends on the chunk: at 8,192 tokens of a 4B model the GPU's work outlasts the launches and a
replay is no faster (docs/benchmarks.md), while the launches' share grows as chunks shrink. ``python -m ivl.bench
inference --prefill eager cuda_graph`` measures both.

A graph is captured for a chunk's shapes (its length and every cache tensor's shape) the second time such a chunk
arrives over a full cache: the first runs eagerly and compiles/autotunes what the capture will record. Anything
else (the chunks that fill the window, padded batches, CPU tensors, a cache that grows) runs eagerly, and so does
everything after a capture that failed.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ivl.model.cache import HybridCache, RecurrentCache, WindowKVCache
from ivl.model.lm import HybridLM

WINDOW_FIELDS = ("keys", "values", "positions", "valid")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor
    position_ids: torch.Tensor
    token_index: torch.Tensor
    inputs: list[dict[str, torch.Tensor]]  # the cache tensors the graph reads (kept alive: it reads their memory)
    cache: HybridCache  # whose tensors, after capture, are the ones the graph writes
    hidden: torch.Tensor


class PrefillGraphs:
    """``lm.hidden_states`` over a cache, replayed from a CUDA graph where one was captured for the call's shapes.

    Holds at most ``max_graphs`` graphs (each keeps a memory pool about the size of one eager chunk's
    activations); the least recently used one goes first.
    """

    def __init__(self, lm: HybridLM, max_graphs: int = 2):
        self.lm, self.max_graphs = lm, max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: set[tuple] = set()
        self._failed = False

    @torch.no_grad()
    def __call__(self, cache: HybridCache, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, hidden] of ``inputs_embeds`` [B, T, hidden] at ``position_ids`` [3, B, T],
        continuing and extending ``cache`` as ``lm.hidden_states`` does."""
        key = self._key(cache, inputs_embeds, position_ids)
        if key is None:
            return self.lm.hidden_states(inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache)
        graph = self._graphs.get(key)
        if graph is None and key in self._seen:
            graph = self._capture(key, cache, inputs_embeds, position_ids)
        if graph is None:
            self._seen.add(key)
            return self.lm.hidden_states(inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache)
        self._graphs.move_to_end(key)
        return _replay(graph, cache, inputs_embeds, position_ids)

    def _key(self, cache, inputs_embeds, position_ids) -> tuple | None:
        """The shapes a graph is specific to, or None where a chunk must run eagerly."""
        if self._failed or not inputs_embeds.is_cuda:
            return None
        shapes = []
        for entry in cache.layers:
            if isinstance(entry, WindowKVCache):
                # A full ring of a window, without padding: the chunk only overwrites slots in place.
                if entry.window is None or entry.keys is None or entry.keys.shape[1] != entry.window:
                    return None
                if not entry.all_valid:
                    return None
            elif not isinstance(entry, RecurrentCache) or entry.state is None:
                return None
            shapes.append(tuple((name, tuple(t.shape), t.dtype) for name, t in _tensors(entry).items()))
        return (tuple(inputs_embeds.shape), inputs_embeds.dtype, tuple(position_ids.shape), tuple(shapes))

    def _capture(self, key, cache, inputs_embeds, position_ids) -> _Graph | None:
        try:
            graph = _capture(self.lm, cache, inputs_embeds, position_ids)
        except Exception as err:  # noqa: BLE001 - any failure to capture leaves the eager path, which is correct
            self._failed = True
            warnings.warn(f"prefill runs eagerly: capturing a CUDA graph of a chunk failed ({err})", stacklevel=3)
            return None
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


def _tensors(entry) -> dict[str, torch.Tensor]:
    if isinstance(entry, WindowKVCache):
        return {name: getattr(entry, name) for name in WINDOW_FIELDS}
    return {"state": entry.state, **{f"conv.{name}": t for name, t in entry.conv.items()}}


def _set_tensors(entry, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(entry, WindowKVCache):
        for name in WINDOW_FIELDS:
            setattr(entry, name, tensors[name])
    else:
        entry.state = tensors["state"]
        entry.conv = {name[len("conv.") :]: t for name, t in tensors.items() if name.startswith("conv.")}


def _token_index(cache: HybridCache, T: int, device) -> torch.Tensor:
    return torch.arange(cache.seen_tokens, cache.seen_tokens + T, device=device)


def _capture(lm: HybridLM, cache: HybridCache, inputs_embeds, position_ids) -> _Graph:
    embeds, positions = inputs_embeds.clone(), position_ids.clone()
    token_index = _token_index(cache, embeds.shape[1], embeds.device)
    # One eager run on a side stream first, as torch.cuda.graph asks: lazy initialisations happen outside capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lm.hidden_states(inputs_embeds=embeds, position_ids=positions, cache=cache.clone(), token_index=token_index)
    torch.cuda.current_stream().wait_stream(side)
    static = cache.clone()
    inputs = [_tensors(entry) for entry in static.layers]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hidden = lm.hidden_states(inputs_embeds=embeds, position_ids=positions, cache=static, token_index=token_index)
    return _Graph(graph, embeds, positions, token_index, inputs, static, hidden)


def _replay(graph: _Graph, cache: HybridCache, inputs_embeds, position_ids) -> torch.Tensor:
    T = inputs_embeds.shape[1]
    graph.embeds.copy_(inputs_embeds)
    graph.position_ids.copy_(position_ids)
    graph.token_index.copy_(_token_index(cache, T, inputs_embeds.device))
    for inputs, entry in zip(graph.inputs, cache.layers):
        for name, t in _tensors(entry).items():
            inputs[name].copy_(t)
    graph.graph.replay()
    # The graph's outputs are overwritten by its next replay: the cache takes copies of its own.
    for out, entry in zip(graph.cache.layers, cache.layers):
        _set_tensors(entry, {name: t.clone() for name, t in _tensors(out).items()})
        if isinstance(entry, WindowKVCache):
            entry.length += T
    cache.seen_tokens += T
    return graph.hidden.clone()
