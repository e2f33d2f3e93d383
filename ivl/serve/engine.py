"""Batched chat generation for the server: left-padded prefill of several prompts through the constant-memory
cache, then one token per step for every row that is still running, each with its own sampling settings.

On a GPU the steps run on CUDA-graph decoders (``ivl.model.generation``), one per batch size, kept between
batches. A row ends as soon as it finishes (a stop token or string, its token budget, or its client gone); on the
dynamic (CPU) path its row is also dropped from the cache, so the others' steps get cheaper.
A row never reads another row's tokens: padding is masked in attention and zeroed into Gated DeltaNet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.distributed.tensor import DTensor

from ivl.data.processing import Processor
from ivl.model.generation import StaticDecoder
from ivl.model.static_cache import StaticCache
from ivl.model.vlm import InfiniteVL


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Prompt:
    """One request, ready for the model: its chat text (placeholders not yet expanded) and media."""

    text: str
    images: list = field(default_factory=list)  # PIL images
    videos: list = field(default_factory=list)  # frame stacks [T, H, W, 3] uint8
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class Delta:
    """What one step added to one row: new text, and the finish reason once the row is done."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Row:
    """Incremental detokenisation and stop strings of one row."""

    def __init__(self, prompt: Prompt, prompt_tokens: int, device):
        self.sampling = prompt.sampling
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.prompt_tokens = prompt_tokens
        self.generator = None
        if prompt.sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(prompt.sampling.seed)

    def advance(self, token: int, cancelled: bool, stop_ids: set[int], processor: Processor) -> Delta:
        """This row's step with the token chosen for it: the new text, and why the row ends if it does."""
        done = None
        if cancelled:
            done = "cancelled"
        elif token in stop_ids:
            done = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= self.sampling.max_tokens:
                done = "length"
        text, stopped = self.text_delta(processor, final=done is not None)
        return Delta(text, "stop" if stopped else done, self.prompt_tokens, len(self.tokens))

    def text_delta(self, processor: Processor, final: bool) -> tuple[str, bool]:
        """(new text, whether a stop string ended the row). Text that could still turn into a stop string, or
        an incomplete UTF-8 sequence, is held back until it is settled."""
        text = processor.decode(self.tokens, skip_special_tokens=True)
        for stop in self.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                out = text[self.sent:at]
                self.sent = at
                return out, True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.sampling.stop), default=0)
            end = max(self.sent, end - hold)
        out = text[self.sent:end]
        self.sent = end
        return out, False


class KeptDecoders:
    """Fixed-shape decoders (``StaticDecoder``, captured in a CUDA graph when ``cuda_graph``), one per batch size
    rounded up to a power of two, built on first use and kept: capturing costs a few decode steps, replaying saves
    hundreds of kernel launches per token, so one capture serves every later batch of its size."""

    def __init__(self, lm, cuda_graph: bool):
        self.lm, self.cuda_graph = lm, cuda_graph
        self.by_size: dict[int, StaticDecoder] = {}

    def load(self, cache, rows: int) -> StaticDecoder:
        """The decoder for ``rows`` rows, holding the prefilled dynamic ``cache`` in its first rows."""
        size = 1 << (rows - 1).bit_length()
        if size not in self.by_size:
            self.by_size[size] = StaticDecoder(self.lm, StaticCache(self.lm, size), cache.seen_tokens,
                                               cuda_graph=self.cuda_graph)
        decoder = self.by_size[size]
        decoder.cache.copy_from(StaticCache.from_cache(self.lm, cache, rows))
        return decoder


class Engine:
    """The model, its processor and the generation loop the server's workers call.

    ``decoder``: "dynamic" decodes through the growing cache and drops finished rows; "static" and "cuda_graph"
    (the default on a GPU) decode through fixed-shape buffers (``StaticDecoder``), one decoder per batch size
    rounded up to a power of two, built on first use and kept: a captured graph replays one launch per token
    instead of hundreds, and serves every later batch of its size. Finished rows stay in such a batch as
    placeholders (decoding is bound by reading the weights, so they cost next to nothing) until the last row
    ends. Models without a sliding window (a growing cache), and models sharded by FSDP, decode dynamically.
    """

    def __init__(self, model: InfiniteVL, processor: Processor, max_context: int | None = None,
                 decoder: str | None = None):
        self.model, self.processor = model.eval(), processor
        self.device = next(model.parameters()).device
        self.stop_ids = set(model.config.eos_token_ids)
        self.max_context = max_context or 32768
        if decoder is None:
            decoder = "cuda_graph" if self.device.type == "cuda" else "dynamic"
        if decoder not in ("dynamic", "static", "cuda_graph"):
            raise ValueError(f"decoder must be 'dynamic', 'static' or 'cuda_graph'; got {decoder!r}")
        if model.lm.config.window is None or any(isinstance(p, DTensor) for p in model.parameters()):
            # a growing cache has no fixed shape; FSDP keeps weights sharded outside the model's forward, where
            # the fixed-shape step reads them
            decoder = "dynamic"
        self.decoder = decoder
        self.decoders = KeptDecoders(model.lm, cuda_graph=decoder == "cuda_graph")

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens the prompt takes after its images and videos are expanded (checked before generating)."""
        return int(self.processor(prompt.text, images=prompt.images or None, videos=prompt.videos or None)
                   ["input_ids"].shape[1])

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], cancelled: Callable[[int], bool] = lambda i: False,
                 ) -> Iterator[list[Delta | None]]:
        """Yields one list per step with a ``Delta`` for each prompt (None for rows that finished earlier).
        ``cancelled(i)`` is asked every step: True ends row i (its client left)."""
        model, lm = self.model, self.model.lm
        batch = self.processor([p.text for p in prompts], images=[im for p in prompts for im in p.images] or None,
                               videos=[v for p in prompts for v in p.videos] or None)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mask = batch["attention_mask"]
        dtype = next(model.parameters()).dtype
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(dtype)
        rows = [_Row(p, int(n), self.device) for p, n in zip(prompts, mask.sum(1).tolist())]
        position_ids, next_position = model.position_ids(
            batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"),
            batch.get("second_per_grid_ts"), mask)
        cache = model.new_cache()
        hidden = model.hidden_states(batch["input_ids"], mask, batch.get("pixel_values"),
                                     batch.get("image_grid_thw"), batch.get("pixel_values_videos"),
                                     batch.get("video_grid_thw"), batch.get("second_per_grid_ts"),
                                     position_ids=position_ids, cache=cache)
        logits = lm.lm_head(hidden[:, -1]).float()
        if self.decoder == "dynamic":
            yield from self._decode_dynamic(rows, logits, cache, next_position, cancelled)
        else:
            yield from self._decode_static(rows, logits, cache, next_position, cancelled)

    def _advance(self, rows: list[_Row], live: list[int], logits: torch.Tensor, cancelled
                 ) -> tuple[list[Delta | None], list[int], list[int]]:
        """One step's deltas, and the logits rows (and their tokens) of the rows that go on."""
        out: list[Delta | None] = [None] * len(rows)
        greedy = logits.argmax(-1).tolist()  # one read-back for every greedy row
        keep, tokens = [], []
        for r, i in enumerate(live):
            row = rows[i]
            token = greedy[r] if row.sampling.temperature <= 0 else _sample(logits[r], row.sampling, row.generator)
            out[i] = row.advance(token, cancelled(i), self.stop_ids, self.processor)
            if out[i].finish_reason is None:
                keep.append(r)
                tokens.append(token)
        return out, keep, tokens

    def _decode_dynamic(self, rows, logits, cache, next_position, cancelled):
        lm = self.model.lm
        live = list(range(len(rows)))  # prompt index of each cache row
        step = 0
        while live:
            out, keep, tokens = self._advance(rows, live, logits, cancelled)
            yield out
            if not keep:
                return
            if len(keep) < len(live):  # finished rows leave the cache: nothing of theirs stays in memory
                index = torch.tensor(keep, device=self.device)
                cache = cache.select_rows(index)
                next_position = next_position.index_select(0, index)
                live = [live[r] for r in keep]
            token = torch.tensor(tokens, device=self.device)
            position = (next_position + step)[None, :, None].expand(3, -1, 1)
            logits = lm(token[:, None], position_ids=position, cache=cache)[:, -1].float()
            step += 1

    def _decode_static(self, rows, logits, cache, next_position, cancelled):
        seen = cache.seen_tokens
        decoder = self.decoders.load(cache, len(rows))
        del cache  # its contents now live in the decoder's buffers
        size = decoder.token.shape[0]
        positions = torch.zeros(size, dtype=next_position.dtype, device=self.device)
        positions[:len(rows)] = next_position.view(-1)
        token = torch.zeros(size, dtype=torch.long, device=self.device)
        live = list(range(len(rows)))  # the rows still running; a decoder row is its prompt's index
        step = 0
        while live:
            out, keep, tokens = self._advance(rows, live, logits[live], cancelled)
            yield out
            if not keep:
                return
            live = [live[r] for r in keep]
            token[live] = torch.tensor(tokens, device=self.device)
            logits = decoder(token, (positions + step)[None, :, None].expand(3, -1, 1), seen + step).float()
            step += 1


def _sample(logits: torch.Tensor, sampling: Sampling, generator) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
