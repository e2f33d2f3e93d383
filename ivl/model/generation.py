"""Generation with the constant-memory cache: chunked prefill, then one token per step."""

from __future__ import annotations

from typing import Callable

import torch

from ivl.model.lm import HybridLM
from ivl.model.static_cache import StaticCache, decode_step

DECODERS = ("dynamic", "static", "cuda_graph")


def generate(
    lm: HybridLM,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    next_position: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    stop_token_ids: list[int],
    pad_token_id: int,
    on_token: Callable[[torch.Tensor], None] | None,
    prefill_chunk: int | None,
    generator: torch.Generator | None,
    return_scores: bool = False,
    decoder: str = "dynamic",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """New tokens [B, n] (and, with return_scores, the logits [B, n, vocab] each token was chosen from). embeds [B, T, hidden] (vision features in place), position_ids [3, B, T], next_position
    [B] the position of the first new token; attention_mask [B, T] 0 on left padding.

    decoder: "dynamic" (the growing cache), "static" (fixed-shape buffers, ``decode_step``) or "cuda_graph" (the
    static step captured once in a CUDA graph and replayed per token: no per-kernel launch cost).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
    if decoder == "cuda_graph" and not embeds.is_cuda:
        raise ValueError("decoder='cuda_graph' needs the model on a CUDA device")
    B, T, _ = embeds.shape
    if attention_mask is not None:
        _check_left_padded(attention_mask)
        if bool(attention_mask.all()):
            attention_mask = None
    cache = lm.new_cache()
    step = prefill_chunk or T
    for start in range(0, T, step):
        end = min(start + step, T)
        hidden = lm.hidden_states(
            inputs_embeds=embeds[:, start:end], position_ids=position_ids[:, :, start:end], cache=cache,
            attention_mask=attention_mask[:, start:end] if attention_mask is not None else None,
        )
    logits = lm.lm_head(hidden[:, -1])
    if decoder == "dynamic":
        step = _dynamic_step(lm, cache)
    else:
        step = StaticDecoder(lm, StaticCache.from_cache(lm, cache, B), T, cuda_graph=decoder == "cuda_graph")
    stops = torch.tensor(stop_token_ids, device=embeds.device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=embeds.device)
    tokens, scores = [], []
    for s in range(max_new_tokens):
        if return_scores:
            scores.append(logits.float())
        token = _select(logits, do_sample, temperature, top_p, generator)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or s == max_new_tokens - 1:
            break
        logits = step(token, (next_position + s)[None, :, None].expand(3, -1, 1), T + s)
    out = torch.stack(tokens, dim=1) if tokens else embeds.new_zeros(B, 0, dtype=torch.long)
    if return_scores:
        return out, torch.stack(scores, dim=1) if scores else embeds.new_zeros(B, 0, lm.config.vocab_size)
    return out


def _dynamic_step(lm, cache):
    def step(token, position, index):
        return lm(token[:, None], position_ids=position, cache=cache)[:, -1]
    return step


class StaticDecoder:
    """``decode_step`` over a ``StaticCache`` and fixed input buffers, optionally captured in a CUDA graph.
    Called as step(token [B], position [3, B, 1], index) -> logits [B, vocab].

    The object owns every tensor the graph reads or writes (cache, inputs, output): a graph holds raw addresses,
    not references, so a buffer freed while the graph lives would be handed to other tensors and then read and
    overwritten by each replay.
    """

    def __init__(self, lm: HybridLM, cache: StaticCache, T: int, cuda_graph: bool):
        B, device = cache.batch, cache.device
        self.lm, self.cache = lm, cache
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.position = torch.zeros(3, B, 1, dtype=torch.long, device=device)
        self.index = torch.tensor(T, device=device)
        self.graph = None
        if cuda_graph:
            # Warm up (compilation, fla's autotuning, packing) on a copy of the cache, so the real one is not
            # advanced, and on a side stream, as capture requires.
            scratch = cache.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    decode_step(lm, scratch, self.token, self.position, self.index)
            torch.cuda.current_stream().wait_stream(side)
            del scratch
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = decode_step(lm, cache, self.token, self.position, self.index)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, index: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        self.index.fill_(index)
        if self.graph is None:
            return decode_step(self.lm, self.cache, self.token, self.position, self.index)
        self.graph.replay()
        return self.logits.clone()


def _select(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p (the top one always).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_left_padded(mask: torch.Tensor) -> None:
    # Once a row starts its real tokens it must not go back to padding.
    bad = (mask[:, 1:] < mask[:, :-1]).any(dim=1)
    if bool(bad.any()):
        raise ValueError(f"generate needs left padding (attention_mask 0 only before the prompt); rows "
                         f"{bad.nonzero().flatten().tolist()} have padding after real tokens")
