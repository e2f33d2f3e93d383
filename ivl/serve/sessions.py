"""Live video sessions: frames go into a cache of the session's own as they arrive, as one unbounded video; a question
is answered from a copy of it, so the stream goes on from where it was. Both run on the decode engine, between its
other work: a push is a prefill that advances the session's cache in place, a question a sequence that starts
from a copy of it and decodes in one of the engine's slots.

A session is one user turn that opens with the video: ``<|im_start|>user\\n<|vision_start|>`` then every pushed
frame (two frames make a temporal patch, as in Qwen2.5-VL), with multimodal RoPE positions whose time axis grows
with the stream. A question closes the video on the copy (``<|vision_end|>``, the question, the assistant turn)
and decodes. Memory stays flat however long the stream runs: attention keeps a window, Gated DeltaNet a state.

Every call is checked before it touches the session: a push whose frames differ in size from each other, or from
a frame still waiting for its pair, is refused and changes nothing.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future

import numpy as np
import torch

from ivl.model.decoding.generation import Sampling, Sequence, Token
from ivl.model.vision import vision_features
from ivl.serve.engine import ChatEngine, Delta

PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"


class SessionError(Exception):
    """A client error in a session call (status: HTTP status to answer with)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class VideoSession:
    """A stream on ``chat``'s engine (running on its own thread: calls wait for their work there)."""

    def __init__(self, chat: ChatEngine, fps: float):
        self.chat, self.fps = chat, fps
        self.model, self.processor = chat.model, chat.processor
        self.cache = self.model.new_cache()
        self.pending: list[np.ndarray] = []  # a frame waiting for its temporal-patch partner
        self.frames = self.patches = 0
        self.lock = threading.Lock()  # one call at a time changes the bookkeeping below
        ids = self.processor.tokenizer(PREFIX, return_tensors="pt")["input_ids"][0]
        self.video_start = len(ids)  # the video's positions start here (Qwen2.5-VL: after the text before it)
        self.max_position = len(ids) - 1
        self._ingest(_text_positions(ids, 0), ids=ids).result()
        self.last_used = time.monotonic()  # idle from when it is ready, not from when its prefill began

    def check_push(self, frames: list[np.ndarray]) -> None:
        sizes = {f.shape for f in self.pending + list(frames)}
        if len(sizes) > 1:
            raise SessionError(
                f"frames of one session must all have one size; got {sorted(s[:2] for s in sizes)}"
                + (" (a frame from the last push still waits for its pair)" if self.pending else ""),
                param="frames",
            )

    def push(self, frames: list[np.ndarray]) -> Future:
        """Ingest frames [H, W, 3] uint8, oldest first; the future resolves once they are in the cache."""
        with self.lock:
            self.check_push(frames)
            self.frames += len(frames)
            frames = self.pending + list(frames)
            usable = len(frames) - len(frames) % self.processor.temporal_patch_size
            self.pending = frames[usable:]
            if usable == 0:
                done: Future = Future()
                done.set_result(None)
                return done
            video = self.processor.videos([np.stack(frames[:usable])], fps=self.fps)
            grid = video["video_grid_thw"]
            t, h, w = grid[0].tolist()
            merge = self.model.config.spatial_merge_size
            h, w = h // merge, w // merge
            interval = self.model.config.tokens_per_second * float(video["second_per_grid_ts"][0])
            steps = torch.arange(self.patches, self.patches + t)
            positions = (
                torch.stack(
                    [
                        (steps * interval).long().repeat_interleave(h * w),
                        torch.arange(h).repeat_interleave(w).repeat(t),
                        torch.arange(w).repeat(h * t),
                    ]
                )
                + self.video_start
            )
            self.patches += t
            self.max_position = max(self.max_position, int(positions.max()))
            return self._ingest(positions, pixels=video["pixel_values_videos"], grid=grid)

    def ask(self, question: str, sampling: Sampling) -> Future:
        """The answer to ``question`` about everything pushed so far (a future of a dict); the stream is not
        advanced."""
        with self.lock:
            text = f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
            ids = self.processor.tokenizer(text, return_tensors="pt")["input_ids"][0]
            positions = _text_positions(ids, self.max_position + 1)
            frames, answer, result = self.frames, [], Future()

            def on_delta(delta: Delta) -> None:
                answer.append(delta.text)
                if delta.finish_reason == "error":
                    result.set_exception(SessionError("the model failed on this question", 500))
                elif delta.finish_reason is not None:
                    result.set_result(
                        {
                            "answer": "".join(answer),
                            "finish_reason": delta.finish_reason,
                            "frames": frames,
                            "completion_tokens": delta.completion_tokens,
                        }
                    )

            self.chat.engine.submit(self.chat.continuation(self.cache, ids, positions, sampling, on_delta))
            return result

    def _ingest(self, positions: torch.Tensor, ids=None, pixels=None, grid=None) -> Future:
        """Prefill into the session's own cache, in place, on the engine's thread."""
        model, device, done = self.model, self.chat.device, Future()

        def prepare(sequence: Sequence) -> None:
            if ids is not None:
                sequence.embeds = model.lm.embed_tokens(ids.to(device))
            else:
                dtype = next(model.parameters()).dtype
                sequence.embeds = vision_features(model.visual, pixels.to(device, dtype), grid.to(device)).to(dtype)
            sequence.position_ids, sequence.next_position = positions.to(device), 0

        def on_token(token: Token) -> None:
            if token.finish == "error":
                done.set_exception(SessionError("the model failed on these frames", 500))
            else:
                done.set_result(None)

        self.chat.engine.submit(
            Sequence(
                prepare=prepare,
                sampling=Sampling(max_tokens=0),
                start=self.cache,
                advance_start=True,
                on_token=on_token,
            )
        )
        return done

    def nbytes(self) -> int:
        return self.cache.nbytes()


def _text_positions(ids: torch.Tensor, start: int) -> torch.Tensor:
    return torch.arange(start, start + len(ids))[None].expand(3, -1)


class SessionStore:
    """Open sessions by id, with an idle timeout and a limit on how many are open at once."""

    def __init__(self, chat: ChatEngine, max_sessions: int = 8, idle_timeout: float = 600.0, fps: float = 2.0):
        self.chat, self.max_sessions, self.idle_timeout, self.fps = chat, max_sessions, idle_timeout, fps
        self.sessions: dict[str, VideoSession] = {}
        self.lock = threading.Lock()

    def expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if v is not None and now - v.last_used > self.idle_timeout]:
            del self.sessions[sid]

    def open(self) -> str:
        with self.lock:
            self.expire()
            if len(self.sessions) >= self.max_sessions:
                raise SessionError(
                    f"{self.max_sessions} sessions are open, the most this server allows; close one "
                    f"or wait for an idle one to expire ({self.idle_timeout:.0f} s)",
                    429,
                )
            sid = uuid.uuid4().hex
            self.sessions[sid] = None  # taken while it starts
        try:
            session = VideoSession(self.chat, self.fps)
        except BaseException:
            with self.lock:
                self.sessions.pop(sid, None)
            raise
        with self.lock:
            self.sessions[sid] = session
        return sid

    def get(self, sid) -> VideoSession:
        with self.lock:
            self.expire()
            session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is None:
            raise SessionError(
                f"no open session {sid!r} (closed, expired after {self.idle_timeout:.0f} s idle, or never opened)",
                404,
                param="session",
            )
        session.last_used = time.monotonic()
        return session

    def close(self, sid) -> None:
        with self.lock:
            if not isinstance(sid, str) or self.sessions.pop(sid, None) is None:
                raise SessionError(f"no open session {sid!r}", 404, param="session")
