"""transformers' Qwen2.5-VL behind the same server, the reference that serving benchmarks compare InfiniteVL with.

``TransformersEngine`` has ``Engine``'s interface (``processor``, ``generate(prompts, cancelled)`` yielding one
``Delta`` per prompt per step) over ``Qwen2_5_VLForConditionalGeneration.generate``: left-padded batch, growing KV
cache, sdpa attention, run in a thread that hands each step's tokens over. A batch shares one sampling setting
(transformers' ``generate`` takes one); per-row token budgets, stop strings and cancellation are applied as the
rows' text is read, and the batch stops once every row is done.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ivl.data.processing import Processor
from ivl.serve.engine import Delta, Prompt, _Row


class _Steps(BaseStreamer):
    """Each generation step's new tokens [B], handed to the reading thread (the first ``put`` is the prompt)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.view(-1).tolist())

    def end(self):
        self.queue.put(None)


class _AllDone(StoppingCriteria):
    def __init__(self, done: Callable[[], bool]):
        self.done = done

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.done(), dtype=torch.bool, device=input_ids.device)


class TransformersEngine:
    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, processor: Processor):
        self.model, self.processor = model.eval(), processor
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop_ids = set(eos) | {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",
                                                                                          "<|endoftext|>")}

    @classmethod
    def from_pretrained(cls, folder: str, device: str = "cpu", dtype: str | None = None) -> "TransformersEngine":
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=getattr(torch, dtype) if dtype else "auto", attn_implementation="sdpa").to(device)
        return cls(model, Processor.from_pretrained(folder))

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], cancelled: Callable[[int], bool] = lambda i: False,
                 ) -> Iterator[list[Delta | None]]:
        first = prompts[0].sampling
        if any((p.sampling.temperature, p.sampling.top_p, p.sampling.seed) !=
               (first.temperature, first.top_p, first.seed) for p in prompts):
            raise ValueError("the transformers baseline decodes a batch with one sampling setting")
        batch = self.processor([p.text for p in prompts], images=[im for p in prompts for im in p.images] or None,
                               videos=[v for p in prompts for v in p.videos] or None)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        dtype = next(self.model.parameters()).dtype
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(dtype)
        rows = [_Row(p, int(n), self.device) for p, n in zip(prompts, batch["attention_mask"].sum(1).tolist())]
        finished: list[str | None] = [None] * len(prompts)
        steps = _Steps()
        kwargs = dict(max_new_tokens=max(p.sampling.max_tokens for p in prompts), streamer=steps,
                      stopping_criteria=StoppingCriteriaList([_AllDone(lambda: all(finished))]),
                      do_sample=first.temperature > 0, pad_token_id=self.processor.tokenizer.pad_token_id)
        if first.temperature > 0:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        errors = []

        def run():
            try:
                self.model.generate(**batch, **kwargs)
            except Exception as error:  # surfaced to the reader
                errors.append(error)
                steps.end()

        threading.Thread(target=run, daemon=True).start()
        while (tokens := steps.queue.get()) is not None:
            out: list[Delta | None] = [None] * len(prompts)
            for i, (row, token) in enumerate(zip(rows, tokens)):
                if finished[i]:
                    continue
                out[i] = row.advance(token, cancelled(i), self.stop_ids, self.processor)
                finished[i] = out[i].finish_reason
            yield out
        if errors:
            raise errors[0]
        out = [Delta(row.text_delta(self.processor, final=True)[0], "length", row.prompt_tokens, len(row.tokens))
               if not finished[i] else None for i, row in enumerate(rows)]
        if any(d is not None for d in out):  # rows the generation ended without a stop (its token budget)
            yield out
