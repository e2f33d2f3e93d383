"""Chat prompts on the decode engine (``ivl.model.decoding.generation``): a prompt's text and media become a token
sequence, the engine's tokens become text, copy by copy (OpenAI's ``n``).

Text comes out incrementally: what could still turn into a stop string, or an incomplete UTF-8 character, is held
back until it is settled; a stop string ends its copy there (and the engine drops the copy's slot). The processor
runs on the caller's thread (tokens, image patches); the vision tower and everything after it on the engine's.
``generate`` drives the engine from the calling thread (evaluation, lmms-eval, tests); the server runs it on a
thread of its own and calls ``start``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ivl.data.processing import Processor
from ivl.model.decoding.generation import Engine, Sampling, Sequence, Token

__all__ = ["ChatEngine", "Delta", "Prompt", "Sampling"]


@dataclass
class Prompt:
    """One request, ready for the model: its chat text (placeholders not yet expanded) and media."""

    text: str
    images: list = field(default_factory=list)  # PIL images
    videos: list = field(default_factory=list)  # frame stacks [T, H, W, 3] uint8
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    constraint: Callable | None = None  # copy -> a structured-output constraint (ivl.serve.structured)


@dataclass
class Delta:
    """What one step added to one copy of a prompt: new text, its tokens' log-probabilities (when asked), and
    the finish reason once the copy is done."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0  # the copy
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "bytes", "top_logprobs"}


class _Text:
    """Incremental detokenisation and stop strings of one copy.

    Each token is decoded with the few before it (from ``prefix``), not the whole answer again: a token's text can
    depend on its neighbours (byte pieces of one character, a leading space), and the text settles once the
    decoded window grows without ending in an incomplete character."""

    def __init__(self, processor: Processor, sampling: Sampling):
        self.processor, self.stops = processor, sampling.stop
        self.tokens: list[int] = []
        self.text = ""  # the settled text so far
        self.prefix = self.read = 0  # tokens[prefix:read] decode to the end of ``text``
        self.sent = 0  # characters of ``text`` already returned
        self.finished = False

    def _settle(self, final: bool) -> None:
        decode = lambda ids: self.processor.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, after = decode(self.tokens[self.prefix : self.read]), decode(self.tokens[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)

    def take(self, token: Token) -> tuple[str, str | None]:
        """(new text, finish reason) after the engine's next token for this copy."""
        if token.id is not None and token.output:
            self.tokens.append(token.id)
        final = token.finish is not None
        self._settle(final)
        text = self.text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                out, self.sent, self.finished = text[self.sent : at], at, True
                return out, "stop"
        end = len(text)
        if not final:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self.sent, end - hold)
        out, self.sent = text[self.sent : end], end
        self.finished = final
        return out, token.finish


VISION_PATCHES_PER_CALL = 1 << 16
"""Patches of the images and videos the vision tower encodes in one call when prompts start together: 64 images of
448x448 (1,024 patches each)."""


class ChatEngine:
    """A model, its processor and the decode engine over ``capacity`` slots (``ivl.model.decoding.generation.Engine``'s
    other arguments pass through)."""

    def __init__(self, model, processor: Processor, capacity: int = 8, **engine):
        self.model, self.processor = model.eval(), processor
        self.engine = Engine(self.model, capacity=capacity, prepare_batch=self.prepare_batch, **engine)
        self.device = self.engine.device

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens the prompt takes after its images and videos are expanded (checked before generating)."""
        return int(
            self.processor(prompt.text, images=prompt.images or None, videos=prompt.videos or None)["input_ids"].shape[
                1
            ]
        )

    def sequence(self, prompt: Prompt, on_delta: Callable[[Delta], None]) -> Sequence:
        """The prompt as the engine's sequence; ``on_delta`` gets every copy's deltas (on the engine's thread)."""
        inputs = self.processor(prompt.text, images=prompt.images or None, videos=prompt.videos or None)
        return self._sequence(
            None,
            int(inputs["input_ids"].shape[1]),
            prompt.sampling,
            prompt.n,
            prompt.constraint,
            on_delta,
            media=inputs,
        )

    def prepare_batch(self, sequences: list[Sequence]) -> None:
        """Embeddings and positions of prompts that start together (on the engine's thread): their token ids are
        laid end to end in one row, so that one vision-tower call encodes all of their images and videos (at most
        ``VISION_PATCHES_PER_CALL`` patches a call, which bounds the tower's activations)."""
        group, patches = [], 0
        for sequence in sequences:
            size = sum(
                sequence.media[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if k in sequence.media
            )
            if group and patches + size > VISION_PATCHES_PER_CALL:
                self._prepare_group(group)
                group, patches = [], 0
            group.append(sequence)
            patches += size
        if group:
            self._prepare_group(group)

    def _prepare_group(self, sequences: list[Sequence]) -> None:
        model, device = self.model, self.device
        dtype = next(model.parameters()).dtype

        def joined(key: str, cast: bool = False):
            parts = [s.media[key] for s in sequences if s.media.get(key) is not None]
            if not parts:
                return None
            tensor = torch.cat(parts).to(device)
            return tensor.to(dtype) if cast else tensor

        ids = torch.cat([s.media["input_ids"][0] for s in sequences])[None].to(device)
        embeds = model.embed(
            ids,
            joined("pixel_values", cast=True),
            joined("image_grid_thw"),
            joined("pixel_values_videos", cast=True),
            joined("video_grid_thw"),
        )[0]
        start = 0
        for sequence in sequences:
            media = {k: v.to(device) if torch.is_tensor(v) else v for k, v in sequence.media.items()}
            length = media["input_ids"].shape[1]
            positions, next_position = model.position_ids(
                media["input_ids"],
                media.get("image_grid_thw"),
                media.get("video_grid_thw"),
                media.get("second_per_grid_ts"),
            )
            sequence.embeds, start = embeds[start : start + length], start + length
            sequence.position_ids, sequence.next_position = positions[:, 0], int(next_position[0])

    def continuation(
        self, cache, ids: torch.Tensor, positions: torch.Tensor, sampling: Sampling, on_delta: Callable[[Delta], None]
    ) -> Sequence:
        """Text tokens ``ids`` [T] at ``positions`` [3, T] after the stream in ``cache`` (a live session's), answered
        from a copy of it: the stream itself stays where it was."""
        device = self.device

        def prepare(sequence: Sequence) -> None:
            sequence.embeds = self.model.lm.embed_tokens(ids.to(device))
            sequence.position_ids, sequence.next_position = positions.to(device), int(positions[0, -1]) + 1

        return self._sequence(prepare, len(ids), sampling, 1, None, on_delta, start=cache)

    def _sequence(
        self,
        prepare,
        prompt_tokens: int,
        sampling: Sampling,
        n: int,
        constraint,
        on_delta: Callable[[Delta], None],
        start=None,
        media: dict | None = None,
    ) -> Sequence:
        texts = [_Text(self.processor, sampling) for _ in range(n)]
        holder: dict[str, Sequence] = {}

        def on_token(token: Token) -> None:
            text = texts[token.copy]
            if text.finished:
                return
            piece, finish = text.take(token)
            if finish == "stop" and token.finish is None:  # a stop string: the copy's slot goes too
                self.engine.cancel(holder["sequence"], token.copy)
            logprobs = (
                self._logprobs(token)
                if sampling.logprobs is not None and token.id is not None and token.output
                else None
            )
            on_delta(Delta(piece, finish, prompt_tokens, len(text.tokens), token.copy, logprobs))

        holder["sequence"] = Sequence(
            prepare=prepare,
            media=media,
            sampling=sampling,
            copies=n,
            on_token=on_token,
            constraint=constraint,
            start=start,
        )
        return holder["sequence"]

    def _logprobs(self, token: Token) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.processor.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [{**entry(token.id, token.logprob), "top_logprobs": [entry(i, lp) for i, lp in (token.top or [])]}]

    def start(self, prompt: Prompt, on_delta: Callable[[Delta], None]) -> Sequence:
        """Submits the prompt to the engine (running on its own thread); cancel with ``cancel``."""
        return self.engine.submit(self.sequence(prompt, on_delta))

    def cancel(self, sequence: Sequence) -> None:
        self.engine.cancel(sequence)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt]) -> Iterator[list[Delta | None]]:
        """Runs the prompts (one copy each) on this thread; yields one list per engine step with each prompt's
        ``Delta`` (None for prompts with nothing new)."""
        pending: list[Delta | None] = [None] * len(prompts)

        def collect(i: int, delta: Delta) -> None:
            if pending[i] is None:
                pending[i] = delta
            else:  # several tokens in one step (the first two come together): one delta
                pending[i] = Delta(
                    pending[i].text + delta.text,
                    delta.finish_reason,
                    delta.prompt_tokens,
                    delta.completion_tokens,
                    delta.index,
                    (pending[i].logprobs or []) + (delta.logprobs or []) or None,
                )

        for i, prompt in enumerate(prompts):
            self.engine.submit(self.sequence(prompt, lambda d, i=i: collect(i, d)))
        while self.engine.busy():
            self.engine.step()
            if any(d is not None for d in pending):
                yield pending
                pending = [None] * len(prompts)
