"""The decode engine: every generation runs here (``InfiniteVL.generate``, the server's requests, live video
sessions' answers, benchmark evaluation).

The hybrid's cache is the same size for every sequence, whatever its length (a window of keys and values per
attention layer, a state per linear layer), so the engine keeps a fixed pool of cache slots (``SlotDecoder``) and
runs continuous batching over it: a sequence is prefilled (in chunks, several short prompts together) into a
slot, joins the running batch at the next step, and leaves it the step it finishes or is cancelled. Every step
decodes one token for each running slot; the slots in use are kept at the front of the pool, so a step reads
only them, and on a GPU it replays a CUDA graph captured once per batch-size bucket (1, 2, 4, ...). While
sequences decode, prefill takes at most ``step_budget`` tokens per step, so a long prompt does not stall
everyone else's tokens.

One sampler serves every sequence: greedy, or temperature and nucleus (top_p) with a generator per sequence
(``seed``), optional log-probabilities of the chosen token and the most likely ones, and an optional
``constraint`` (structured output) that masks the tokens it does not allow.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ivl.model.cache import HybridCache
from ivl.model.decoding.static_cache import StaticCache, decode_step

DECODERS = ("static", "cuda_graph")


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # each copy of a sequence draws from its own generator (seed + copy)
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    stop: list[str] = field(default_factory=list)  # stop strings: applied to the text, by the serving layer
    stop_token_ids: set[int] | None = None  # None: the model's end-of-sequence tokens
    generator: torch.Generator | None = None  # without a seed: draw from this one (shared by whoever passes it)


class Constraint(Protocol):
    """Structured output: which tokens may come next, told each token that came."""

    def mask(self, logits: torch.Tensor) -> None:  # [vocab]: -inf, in place, where a token may not come next
        ...

    def accept(self, token: int) -> None: ...

    def finished(self) -> bool: ...


@dataclass
class Token:
    """One new token of one copy of a sequence, and how the copy ends if it does."""

    copy: int
    id: int | None  # None when the copy ends without a token (cancelled)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, log-probability), most likely first
    finish: str | None = None  # "stop" | "length" | "cancelled" | "error"
    output: bool = True  # False for a stop token: it ends the copy but is no part of its text
    logits: torch.Tensor | None = None  # [vocab], the distribution it was chosen from (``Sequence.keep_logits``)


@dataclass(eq=False)
class Sequence:
    """One generation at the token level.

    Its input is ``embeds`` [T, hidden] with ``position_ids`` [3, T] (multimodal RoPE) and ``next_position`` (the
    first new token's), or ``prepare``, called on the engine's thread when the sequence starts, which sets them (the
    vision tower runs there), or ``media``: the processor's tensors of a prompt, which the engine's
    ``prepare_batch`` turns into them together with the other prompts that start at the same step. ``start``: a
    one-row cache to continue (a live session's stream): prefilled into a copy of it, or into it, in place, with
    ``advance_start`` (``sampling.max_tokens`` 0: only ingest). ``copies``: answers drawn from the one prefill
    (OpenAI's ``n``), each in its own slot. ``on_token`` receives every ``Token`` (on the engine's thread);
    ``constraint(copy)`` gives a copy its structured-output constraint; ``keep_logits`` puts each token's logits in
    its ``Token``.
    """

    embeds: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    next_position: int | None = None
    prepare: Callable[[Sequence], None] | None = None
    media: dict | None = None
    sampling: Sampling = field(default_factory=Sampling)
    start: HybridCache | None = None
    advance_start: bool = False
    copies: int = 1
    on_token: Callable[[Token], None] | None = None
    constraint: Callable[[int], Constraint] | None = None
    keep_logits: bool = False
    cancelled: bool = False  # set by Engine.cancel
    cancelled_copies: set[int] = field(default_factory=set)
    error: Exception | None = None  # why it ended with finish "error"
    # the engine's bookkeeping
    prompt_tokens: int = 0
    _cache: HybridCache | None = None
    _done: int = 0  # prompt tokens prefilled so far
    _shift: int = 0  # left padding of its prefill batch (not part of its stream)


@dataclass(eq=False)
class _Row:
    """A copy of a sequence in a decoding slot."""

    sequence: Sequence
    copy: int
    token: int  # the last token, fed to the next step
    index: int  # that token's index in the row's stream
    position: int  # its RoPE position (all three axes: text)
    count: int  # tokens generated so far
    generator: torch.Generator | None
    constraint: Constraint | None


class SlotDecoder:
    """A pool of ``capacity`` static cache slots and the decode step over its first rows: eager, or replayed from a
    CUDA graph captured per bucket (the next power of two of the rows in use), built on first use and kept. A graph
    reads and writes fixed addresses: the pool's buffers and the step's input buffers, owned here for its life."""

    def __init__(self, lm, capacity: int, ring: int | None = None, cuda_graph: bool = False):
        self.lm, self.capacity = lm, capacity
        self.pool = StaticCache(lm, capacity, ring=ring)
        device = self.pool.device
        self.token = torch.zeros(capacity, dtype=torch.long, device=device)
        self.position = torch.zeros(3, capacity, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(capacity, dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, rows: int) -> int:
        return min(1 << (rows - 1).bit_length(), self.capacity)

    def __call__(self, tokens: list[int], positions: list[int], indices: list[int]) -> torch.Tensor:
        """Logits [n, vocab] of one step for slots 0..n-1, advancing them in place (slots up to the bucket's size
        take placeholder steps: they are free)."""
        n, device = len(tokens), self.token.device
        self.token[:n] = torch.tensor(tokens, device=device)
        self.position[:, :n, 0] = torch.tensor(positions, device=device)
        self.index[:n] = torch.tensor(indices, device=device)
        size = self.bucket(n)
        if not self.cuda_graph:
            return decode_step(
                self.lm, self.pool.rows(size), self.token[:size], self.position[:, :size], self.index[:size]
            )[:n]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]

    def _capture(self, size: int):
        # Warm up (compilation, autotuning) on a scratch copy of the first rows, so no slot in use advances, and on
        # a side stream, as capture requires; then capture on the pool itself (capture runs nothing).
        scratch = self.pool.rows(size).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_step(self.lm, scratch, self.token[:size], self.position[:, :size], self.index[:size])
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode_step(
                self.lm, self.pool.rows(size), self.token[:size], self.position[:, :size], self.index[:size]
            )
        return graph, logits


class Engine:
    """Continuous batching over a ``SlotDecoder`` of ``capacity`` slots for ``model`` (an InfiniteVL).

    ``submit`` and ``cancel`` may be called from any thread; ``step`` (or ``run``, its loop on a thread of its
    own) does the work. ``prefill_chunk``: the most prompt tokens one prefill call takes; ``step_budget``: the most
    prompt tokens prefilled between two decode steps while sequences are decoding. ``max_context``: prompt and
    new tokens of one sequence (with full attention, the slots' ring size). ``decoder``: "cuda_graph" (the default
    on a GPU) or "static" (eager). ``prepare_batch``: sets ``embeds`` and positions of the sequences with ``media``
    that start at the same step, all at once (one vision-tower call for their images: per call, the tower's time
    is mostly fixed host work); it raises if any of them fails, and then each is prepared alone, so that only the
    one whose input fails ends with an error.
    """

    def __init__(
        self,
        model,
        capacity: int = 8,
        prefill_chunk: int = 8192,
        step_budget: int = 4096,
        max_context: int = 32768,
        decoder: str | None = None,
        prepare_batch: Callable[[list[Sequence]], None] | None = None,
    ):
        self.model, self.lm = model, model.lm
        self.device = self.lm.embed_tokens.weight.device
        decoder = decoder or ("cuda_graph" if self.device.type == "cuda" else "static")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
        if decoder == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("decoder='cuda_graph' needs the model on a CUDA device")
        self.capacity, self.prefill_chunk, self.step_budget = capacity, prefill_chunk, step_budget
        self.max_context = max_context
        self.prepare_batch = prepare_batch
        self.decoder = SlotDecoder(self.lm, capacity, ring=max_context, cuda_graph=decoder == "cuda_graph")
        self.stop_ids = set(model.config.eos_token_ids)
        self.inbox: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()  # not started: no slot reserved yet
        self.prefilling: deque[Sequence] = deque()  # started: slots reserved, prompt (partly) prefilled
        self.rows: list[_Row] = []  # decoding; row i is slot i
        self.reserved = 0  # slots held by prefilling sequences
        self._wake = threading.Condition()
        self._stopped = False

    # ---- any thread -------------------------------------------------------------------------------------------
    def submit(self, sequence: Sequence) -> Sequence:
        if sequence.copies > self.capacity:
            raise ValueError(f"{sequence.copies} copies of one sequence; the engine has {self.capacity} slots")
        with self._wake:
            self.inbox.append(sequence)
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence, copy: int | None = None) -> None:
        """Ends the sequence (or one copy of it) at the next step: its slots go to others."""
        if copy is None:
            sequence.cancelled = True
        else:
            sequence.cancelled_copies.add(copy)
        with self._wake:
            self._wake.notify()

    def busy(self) -> bool:
        return bool(self.inbox or self.waiting or self.prefilling or self.rows)

    def run(self) -> None:
        """Steps for as long as the engine lives, sleeping while there is nothing to do (the server's thread). A
        step that fails (out of memory, say) ends every sequence in flight with finish "error"; the engine goes
        on with the next ones."""
        while True:
            with self._wake:
                while not self.busy() and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001  (the server must outlive a failed step)
                self._fail_all(error)

    def _fail_all(self, error: Exception) -> None:
        in_flight = [*self.waiting, *self.prefilling, *{id(r.sequence): r.sequence for r in self.rows}.values()]
        self.waiting.clear()
        self.prefilling.clear()
        self.rows.clear()
        self.reserved = 0
        for sequence in in_flight:
            sequence.error = error
            for copy in range(sequence.copies):
                _emit(sequence, Token(copy, None, finish="error"))

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    # ---- the engine's thread ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One round: new sequences admitted, cancelled ones dropped, one decode step, then prefill."""
        with self._wake:
            self.waiting.extend(self.inbox)
            self.inbox.clear()
        self._drop_cancelled()
        if self.rows:
            self._decode()
        self._prefill(self.step_budget if self.rows else self.prefill_chunk)

    def run_until_done(self, sequences: list[Sequence]) -> None:
        """Submits ``sequences`` and steps until every one has finished (``InfiniteVL.generate``, evaluation)."""
        for sequence in sequences:
            self.submit(sequence)
        while self.busy():
            self.step()

    def _drop_cancelled(self) -> None:
        for queue in (self.waiting, self.prefilling):
            for sequence in [s for s in queue if s.cancelled]:
                queue.remove(sequence)
                if queue is self.prefilling:
                    self.reserved -= sequence.copies
                for copy in range(sequence.copies):
                    _emit(sequence, Token(copy, None, finish="cancelled"))
        for i in reversed(range(len(self.rows))):
            if self.rows[i].sequence.cancelled or self.rows[i].copy in self.rows[i].sequence.cancelled_copies:
                row = self.rows[i]
                self._free(i)
                _emit(row.sequence, Token(row.copy, None, finish="cancelled"))

    def _decode(self) -> None:
        rows = self.rows
        logits = self.decoder([r.token for r in rows], [r.position for r in rows], [r.index for r in rows])
        chosen = self._sample(logits.float().clone(), rows)
        for i in reversed(range(len(rows))):  # freeing moves the last row into i: go backwards
            row, (token, logprob, top) = rows[i], chosen[i]
            row.index, row.position = row.index + 1, row.position + 1
            finish = self._advance(row, token)
            kept = logits[i].float() if row.sequence.keep_logits else None
            _emit(row.sequence, Token(row.copy, token, logprob, top, finish, not self._is_stop(row, token), kept))
            if finish is not None:
                self._free(i)

    def _is_stop(self, row: _Row, token: int) -> bool:
        stops = row.sequence.sampling.stop_token_ids
        return token in (self.stop_ids if stops is None else stops)

    def _advance(self, row: _Row, token: int) -> str | None:
        """Takes the row's new token; why the row ends with it, if it does."""
        row.token, row.count = token, row.count + 1
        if self._is_stop(row, token):
            return "stop"
        if row.constraint is not None:
            row.constraint.accept(token)
            if row.constraint.finished():
                return "stop"
        if row.count >= row.sequence.sampling.max_tokens or row.index + 1 >= self.max_context:
            return "length"
        return None

    def _free(self, i: int) -> None:
        """Row i leaves; the last row moves into its slot, so the rows in use stay at the front of the pool."""
        last = len(self.rows) - 1
        if i != last:
            self.decoder.pool.move_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()

    # ---- prefill ----------------------------------------------------------------------------------------------
    def _prefill(self, budget: int) -> None:
        admitted = []
        while self.waiting and self.reserved + len(self.rows) + self.waiting[0].copies <= self.capacity:
            sequence = self.waiting.popleft()
            self.reserved += sequence.copies
            admitted.append(sequence)
        for sequence in self._prepare(admitted):
            sequence.prompt_tokens = sequence.embeds.shape[0]
            if sequence.prompt_tokens + sequence.sampling.max_tokens > self.max_context and not sequence.advance_start:
                self.reserved -= sequence.copies
                self._refuse(sequence)
                continue
            self.prefilling.append(sequence)
        while budget > 0 and self.prefilling:
            head = self.prefilling[0]
            if head._done == 0 and head.start is None and head.prompt_tokens <= budget:
                group = [head]  # short prompts from scratch: prefilled together, left-padded
                for other in list(self.prefilling)[1:]:
                    if (
                        other._done
                        or other.start is not None
                        or sum(s.prompt_tokens for s in group) + other.prompt_tokens > budget
                    ):
                        break
                    group.append(other)
                self._prefill_together(group)
                budget -= sum(s.prompt_tokens for s in group)
            else:
                budget -= self._prefill_chunk(head, min(budget, self.prefill_chunk))

    def _prepare(self, admitted: list[Sequence]) -> list[Sequence]:
        """The admitted sequences with their inputs ready; one whose own input fails ends with an error."""
        batch = [s for s in admitted if s.media is not None and self.prepare_batch is not None]
        alone = {id(s) for s in batch}
        if len(batch) > 1:
            try:
                self.prepare_batch(batch)
                alone = set()
            except Exception:  # noqa: BLE001  (some sequence's input: find which, one at a time)
                pass
        ready = []
        for sequence in admitted:
            try:
                if id(sequence) in alone:
                    self.prepare_batch([sequence])
                elif sequence.media is not None and self.prepare_batch is None:
                    raise ValueError("a sequence with media needs an engine with prepare_batch")
                elif sequence.prepare is not None:
                    sequence.prepare(sequence)
            except Exception as error:  # noqa: BLE001  (this sequence's input, not the engine, failed)
                self.reserved -= sequence.copies
                sequence.error = error
                for copy in range(sequence.copies):
                    _emit(sequence, Token(copy, None, finish="error"))
                continue
            ready.append(sequence)
        return ready

    def _prefill_chunk(self, sequence: Sequence, size: int) -> int:
        if sequence._cache is None:
            start = sequence.start
            sequence._cache = (
                start
                if (start is not None and sequence.advance_start)
                else start.clone()
                if start is not None
                else self.lm.new_cache()
            )
        end = min(sequence._done + size, sequence.prompt_tokens)
        hidden = self.lm.hidden_states(
            inputs_embeds=sequence.embeds[None, sequence._done : end],
            position_ids=sequence.position_ids[:, None, sequence._done : end],
            cache=sequence._cache,
        )
        taken, sequence._done = end - sequence._done, end
        if end == sequence.prompt_tokens:
            self.prefilling.remove(sequence)
            self._decode_first(sequence, self.lm.lm_head(hidden[:, -1]).float()[0], sequence._cache, row=None)
        return taken

    def _prefill_together(self, group: list[Sequence]) -> None:
        longest = max(s.prompt_tokens for s in group)
        embeds = group[0].embeds.new_zeros(len(group), longest, group[0].embeds.shape[-1])
        positions = torch.ones(3, len(group), longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(group), longest, dtype=torch.long, device=self.device)
        for r, sequence in enumerate(group):
            pad = longest - sequence.prompt_tokens
            embeds[r, pad:] = sequence.embeds
            positions[:, r, pad:] = sequence.position_ids
            mask[r, pad:] = 1
            sequence._shift, sequence._done = pad, sequence.prompt_tokens
            self.prefilling.remove(sequence)
        cache = self.lm.new_cache()
        hidden = self.lm.hidden_states(
            inputs_embeds=embeds, position_ids=positions, cache=cache, attention_mask=None if bool(mask.all()) else mask
        )
        logits = self.lm.lm_head(hidden[:, -1]).float()
        for r, sequence in enumerate(group):
            self._decode_first(sequence, logits[r], cache, row=r)

    def _decode_first(self, sequence: Sequence, logits: torch.Tensor, cache: HybridCache, row: int | None) -> None:
        """After its prompt: the first token of each copy, sampled from the prompt's last logits; the copies that
        go on take slots holding the prompt's cache (row ``row`` of a shared one)."""
        self.reserved -= sequence.copies
        seen = cache.seen_tokens - sequence._shift
        if sequence.sampling.max_tokens == 0:  # ingesting only (a live session's frames)
            _emit(sequence, Token(0, None, finish="length"))
            sequence._cache = None
            return
        one_row = cache if row is None else cache.select_rows(torch.tensor([row], device=self.device))
        for copy in range(sequence.copies):
            generator = sequence.sampling.generator
            if sequence.sampling.seed is not None:
                generator = torch.Generator(self.device).manual_seed(sequence.sampling.seed + copy)
            new = _Row(
                sequence,
                copy,
                token=-1,
                index=seen,
                position=sequence.next_position,
                count=0,
                generator=generator,
                constraint=sequence.constraint(copy) if sequence.constraint else None,
            )
            ((token, logprob, top),) = self._sample(logits[None].clone(), [new])
            finish = self._advance(new, token)
            _emit(
                sequence,
                Token(
                    copy,
                    token,
                    logprob,
                    top,
                    finish,
                    not self._is_stop(new, token),
                    logits if sequence.keep_logits else None,
                ),
            )
            if finish is None:
                self.decoder.pool.load(len(self.rows), one_row, sequence._shift)
                self.rows.append(new)
        sequence._cache = None

    def _refuse(self, sequence: Sequence) -> None:
        for copy in range(sequence.copies):
            _emit(sequence, Token(copy, None, finish="length"))

    # ---- sampling ---------------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[tuple[int, float | None, list | None]]:
        """The token of each row from its logits [n, vocab] (float32), with log-probabilities where asked."""
        for i, row in enumerate(rows):
            if row.constraint is not None:
                row.constraint.mask(logits[i])
        greedy = logits.argmax(-1).tolist()  # one read-back for every greedy row
        tokens = [
            greedy[i]
            if row.sequence.sampling.temperature <= 0
            else sample(logits[i], row.sequence.sampling, row.generator)
            for i, row in enumerate(rows)
        ]
        out = []
        asked = [i for i, row in enumerate(rows) if row.sequence.sampling.logprobs is not None]
        logprobs = torch.log_softmax(logits[asked], dim=-1) if asked else None
        for i, token in enumerate(tokens):
            if i not in asked:
                out.append((token, None, None))
                continue
            row_logprobs = logprobs[asked.index(i)]
            k = rows[i].sequence.sampling.logprobs
            top = row_logprobs.topk(k) if k else None
            out.append(
                (
                    token,
                    float(row_logprobs[token]),
                    list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
                )
            )
        return out


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from logits [vocab]: greedy at temperature 0, else from the softmax at ``temperature`` cut to its
    nucleus (the smallest set of most likely tokens whose mass reaches ``top_p``; the top one always)."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _emit(sequence: Sequence, token: Token) -> None:
    if sequence.on_token is not None:
        sequence.on_token(token)


# ---- InfiniteVL.generate --------------------------------------------------------------------------------------


def generate(
    model,
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
    prefill_chunk: int | None,
    generator: torch.Generator | None,
    return_scores: bool = False,
    decoder: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """New tokens [B, n] of a left-padded batch (rows that stop early are padded with ``pad_token_id``), through the
    engine: each row a sequence of its own. embeds [B, T, hidden] (vision features in place), position_ids
    [3, B, T], next_position [B]; with ``return_scores`` also the logits [B, n, vocab] each token was chosen from.
    ``generator``: one generator that every sampled row draws from, in row order."""
    if attention_mask is not None:
        _check_left_padded(attention_mask)
    B, T, _ = embeds.shape
    pads = (T - attention_mask.sum(1)).tolist() if attention_mask is not None else [0] * B
    sampling = Sampling(
        max_tokens=max_new_tokens,
        temperature=temperature if do_sample else 0.0,
        top_p=top_p,
        stop_token_ids=set(stop_token_ids),
        generator=generator,
    )
    tokens: list[list[int]] = [[] for _ in range(B)]
    scores: list[list[torch.Tensor]] = [[] for _ in range(B)]

    def keep(b: int, token: Token) -> None:
        if token.id is not None:
            tokens[b].append(token.id)
            if return_scores:
                scores[b].append(token.logits)

    engine = Engine(
        model,
        capacity=B,
        prefill_chunk=prefill_chunk or T,
        step_budget=prefill_chunk or T,
        max_context=T + max_new_tokens + 1,
        decoder=decoder,
    )
    sequences = [
        Sequence(
            embeds=embeds[b, p:],
            position_ids=position_ids[:, b, p:],
            next_position=int(next_position[b]),
            sampling=sampling,
            on_token=lambda t, b=b: keep(b, t),
            keep_logits=return_scores,
        )
        for b, p in enumerate(int(p) for p in pads)
    ]
    if max_new_tokens > 0:
        engine.run_until_done(sequences)
    n = max((len(t) for t in tokens), default=0)
    out = torch.full((B, n), pad_token_id, dtype=torch.long, device=embeds.device)
    for b, row in enumerate(tokens):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=embeds.device)
    if not return_scores:
        return out
    stacked = embeds.new_zeros(B, n, model.lm.config.vocab_size, dtype=torch.float32)
    for b, row in enumerate(scores):
        if row:
            stacked[b, : len(row)] = torch.stack(row)
    return out, stacked


def _check_left_padded(mask: torch.Tensor) -> None:
    # Once a row starts its real tokens it must not go back to padding.
    bad = (mask[:, 1:] < mask[:, :-1]).any(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"generate needs left padding (attention_mask 0 only before the prompt); rows "
            f"{bad.nonzero().flatten().tolist()} have padding after real tokens"
        )
