"""One sample -> model inputs: media decoded and patched, chat template applied, labels on the answers only."""

from __future__ import annotations

import torch

from ivl.data.corpus import BadSample, Sample
from ivl.data.media import load_image, load_video
from ivl.data.processing import Processor

TRUNCATION = ("error", "truncate")


class SampleEncoder:
    """Callable turning a ``Sample`` into a dict of tensors for InfiniteVL (one sequence, no batch axis on ids):
    input_ids [T], labels [T] (-100 except on assistant answers and their end-of-turn token), and the vision
    inputs (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts) when present.

    Over ``max_tokens``: "error" raises BadSample; "truncate" cuts the end of the text, but never through an
    image or video (then it raises too).
    """

    def __init__(self, processor: Processor, max_tokens: int = 8192, truncation: str = "error",
                 video_fps: float = 2.0, video_max_frames: int = 64):
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}; got {truncation!r}")
        self.processor = processor
        self.max_tokens, self.truncation = max_tokens, truncation
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        tok = processor.tokenizer
        # The turn's header without its newline: a BPE may merge that newline with the answer's leading spaces
        # ("\n  * If ..." -> "\n " + " *"), so the newline is skipped only where it is a token of its own.
        self.answer_start = tok.encode("<|im_start|>assistant", add_special_tokens=False)
        self.newline = tok.encode("\n", add_special_tokens=False)
        self.turn_end = tok.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, sample: Sample) -> dict:
        images = [load_image(m, sample.source) for m in sample.media if m.kind == "image"]
        videos, rates = [], []
        for m in sample.media:
            if m.kind == "video":
                frames, rate = load_video(m, sample.source, self.video_fps, self.video_max_frames,
                                          self.processor.temporal_patch_size)
                videos.append(frames)
                rates.append(rate)
        text = self.processor.apply_chat_template(sample.messages)
        inputs = self.processor(text, images=images or None, videos=videos or None, fps=rates or 2.0)
        input_ids = inputs.pop("input_ids")[0]
        inputs.pop("attention_mask")
        labels = self._answer_labels(input_ids)
        if len(input_ids) > self.max_tokens:
            input_ids, labels = self._truncate(input_ids, labels, sample.source)
        return {"input_ids": input_ids, "labels": labels, **inputs, "source": sample.source, "task": sample.task}

    def _answer_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Copy ids inside assistant turns (after '<|im_start|>assistant\\n', through '<|im_end|>'), -100 elsewhere;
        a newline merged into the answer's first token stays part of the answer."""
        labels = torch.full_like(ids, -100)
        ids_list, start, n = ids.tolist(), self.answer_start, len(self.answer_start)
        i = 0
        while i < len(ids_list):
            if ids_list[i:i + n] == start:
                first = i + n + (len(self.newline) if ids_list[i + n:i + n + len(self.newline)] == self.newline else 0)
                j = first
                while j < len(ids_list) and ids_list[j] != self.turn_end:
                    j += 1
                labels[first:j + 1] = ids[first:j + 1]
                i = j + 1
            else:
                i += 1
        return labels

    def _truncate(self, ids, labels, source):
        over = f"{len(ids)} tokens, over the per-sample budget of {self.max_tokens}"
        if self.truncation == "error":
            raise BadSample(f"{source}: {over} (set truncation: truncate, or raise max_tokens)")
        vision = (ids == self.processor.image_token_id) | (ids == self.processor.video_token_id)
        if bool(vision[self.max_tokens:].any()):
            raise BadSample(f"{source}: {over}, and truncating would cut through an image or video")
        if not bool((labels[:self.max_tokens] != -100).any()):
            raise BadSample(f"{source}: {over}, and truncating would leave no answer token")
        return ids[:self.max_tokens], labels[:self.max_tokens]
