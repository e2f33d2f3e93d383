"""Live video sessions: frames go into the model's constant-memory cache as they arrive, as one unbounded video;
a question is answered from a copy of the cache, so the stream goes on from where it was.

A session is one user turn that opens with the video: ``<|im_start|>user\\n<|vision_start|>`` then every pushed
frame (two frames make a temporal patch, as in Qwen2.5-VL), with multimodal RoPE positions whose time axis grows
with the stream. A question closes the video on the copy (``<|vision_end|>``, the question, the assistant turn)
and decodes. Memory stays flat however long the stream runs: attention keeps a window, Gated DeltaNet a state.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import torch

from ivl.model.vision import vision_features
from ivl.serve.engine import KeptDecoders, Sampling, _sample

PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"


class SessionError(Exception):
    """A client error in a session call (status: HTTP status to answer with)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class VideoSession:
    """``decoders``: kept fixed-shape decoders (the server's, shared by its sessions) that answers decode on;
    None decodes through the dynamic cache."""

    def __init__(self, model, processor, fps: float, decoders: KeptDecoders | None = None):
        self.model, self.processor, self.fps, self.decoders = model, processor, fps, decoders
        self.device = next(model.parameters()).device
        self.cache = model.new_cache()
        self.pending: list[np.ndarray] = []  # a frame waiting for its temporal-patch partner
        self.frames = 0
        self.patches = 0
        ids = processor.tokenizer(PREFIX, return_tensors="pt")["input_ids"].to(self.device)
        n = ids.shape[1]
        self._text(ids, start=0)
        self.video_start = n  # the video's positions start here (Qwen2.5-VL: after the text before it)
        self.last_used = time.monotonic()  # idle from when it is ready, not from when its prefill began
        self.max_position = n - 1

    def _text(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Prefill text tokens [1, n] at positions start.. on all three axes; the hidden states."""
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None, None].expand(3, 1, -1)
        return self.model.lm.hidden_states(ids, position_ids=positions, cache=self.cache)

    @torch.no_grad()
    def push(self, frames: list[np.ndarray]) -> None:
        """Ingest frames [H, W, 3] uint8 (all of one size), oldest first."""
        self.frames += len(frames)
        frames = self.pending + list(frames)
        usable = len(frames) - len(frames) % self.processor.temporal_patch_size
        self.pending = frames[usable:]
        if usable == 0:
            return
        video = self.processor.videos([np.stack(frames[:usable])], fps=self.fps)
        grid = video["video_grid_thw"].to(self.device)
        dtype = next(self.model.parameters()).dtype
        features = vision_features(self.model.visual, video["pixel_values_videos"].to(self.device, dtype), grid)
        t, h, w = grid[0].tolist()
        merge = self.model.config.spatial_merge_size
        h, w = h // merge, w // merge
        interval = self.model.config.tokens_per_second * float(video["second_per_grid_ts"][0])
        steps = torch.arange(self.patches, self.patches + t, device=self.device)
        time_axis = (steps * interval).long().repeat_interleave(h * w)
        rows = torch.arange(h, device=self.device).repeat_interleave(w).repeat(t)
        cols = torch.arange(w, device=self.device).repeat(h * t)
        positions = torch.stack([time_axis, rows, cols]) + self.video_start
        self.model.lm.hidden_states(inputs_embeds=features[None].to(dtype), position_ids=positions[:, None],
                                    cache=self.cache)
        self.patches += t
        self.max_position = max(self.max_position, int(positions.max()))

    @torch.no_grad()
    def ask(self, question: str, sampling: Sampling) -> dict:
        """The answer to ``question`` about everything pushed so far; the stream itself is not advanced."""
        stream = self.cache
        self.cache = stream.clone()
        try:
            text = f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
            ids = self.processor.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
            start = self.max_position + 1
            hidden = self._text(ids, start)
            logits = self.model.lm.lm_head(hidden[:, -1])[0].float()
            stops = set(self.model.config.eos_token_ids)
            generator = torch.Generator(self.device).manual_seed(sampling.seed) if sampling.seed is not None else None
            tokens, finish = [], "length"
            position = start + ids.shape[1]
            step = self._decode_step(position)
            for _ in range(sampling.max_tokens):
                token = _sample(logits, sampling, generator)
                if token in stops:
                    finish = "stop"
                    break
                tokens.append(token)
                logits = step(token)
            return {"answer": self.processor.decode(tokens), "finish_reason": finish,
                    "frames": self.frames, "completion_tokens": len(tokens)}
        finally:
            self.cache = stream

    def _decode_step(self, position: int):
        """token -> next logits [vocab], advancing the (copied) cache: on a kept decoder where there is one."""
        state = {"position": position, "index": self.cache.seen_tokens}
        decoder = self.decoders.load(self.cache, 1) if self.decoders is not None else None

        def step(token: int) -> torch.Tensor:
            tok = torch.tensor([token], device=self.device)
            pos = torch.full((3, 1, 1), state["position"], device=self.device)
            if decoder is not None:
                logits = decoder(tok, pos, state["index"])[0].float()
            else:
                logits = self.model.lm(tok[:, None], position_ids=pos, cache=self.cache)[0, -1].float()
            state["position"] += 1
            state["index"] += 1
            return logits

        return step

    def nbytes(self) -> int:
        return self.cache.nbytes()


class SessionStore:
    """Open sessions by id, with an idle timeout and a limit on how many are open at once. On a GPU their answers
    decode on one kept CUDA-graph decoder (``decoder``: "cuda_graph", "static" or "dynamic"; None picks)."""

    def __init__(self, model, processor, max_sessions: int = 8, idle_timeout: float = 600.0, fps: float = 2.0,
                 decoder: str | None = None):
        self.model, self.processor = model, processor
        if decoder is None:
            decoder = "cuda_graph" if next(model.parameters()).is_cuda else "dynamic"
        kept = decoder != "dynamic" and model.lm.config.window is not None
        self.decoders = KeptDecoders(model.lm, cuda_graph=decoder == "cuda_graph") if kept else None
        self.max_sessions, self.idle_timeout, self.fps = max_sessions, idle_timeout, fps
        self.sessions: dict[str, VideoSession] = {}
        self.lock = threading.Lock()

    def expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v.last_used > self.idle_timeout]:
            del self.sessions[sid]

    def open(self) -> str:
        with self.lock:
            self.expire()
            if len(self.sessions) >= self.max_sessions:
                raise SessionError(f"{self.max_sessions} sessions are open, the most this server allows; close one "
                                   f"or wait for an idle one to expire ({self.idle_timeout:.0f} s)", 429)
            sid = uuid.uuid4().hex
            self.sessions[sid] = VideoSession(self.model, self.processor, self.fps, self.decoders)
            return sid

    def get(self, sid) -> VideoSession:
        with self.lock:
            self.expire()
            session = self.sessions.get(sid)
        if session is None:
            raise SessionError(f"no open session {sid!r} (closed, expired after {self.idle_timeout:.0f} s idle, or "
                               f"never opened)", 404)
        session.last_used = time.monotonic()
        return session

    def close(self, sid) -> None:
        with self.lock:
            if self.sessions.pop(sid, None) is None:
                raise SessionError(f"no open session {sid!r}", 404)
