"""The server: an OpenAI-compatible chat API, live video sessions and a web page, on FastAPI.

One process: uvicorn's event loop takes the requests, checks them completely (``ivl.serve.messages``) and turns
them into prompts on worker threads (JSON, images, tokens), then submits them to the decode engine, which runs on a
thread of its own (``ivl.model.decoding.generation``: continuous batching over a pool of cache slots). Tokens come
back to each request's queue as the engine makes them. A request refused is refused before it reaches the engine, so it
never touches another request's batch; a client that leaves ends its sequence at the next step.

Why not LitServe (docs/architecture.md): its continuous batching leaves the slots, the prefill budget and the step
to the user's API anyway, behind a worker process; it has no way to end a request whose client left, no room for
live sessions in the same slots, and OpenAI-exact responses needed its private buffers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivl.serve import messages
from ivl.serve.engine import ChatEngine, Delta, Prompt
from ivl.serve.messages import ApiError
from ivl.serve.sessions import SessionError, SessionStore
from ivl.serve.structured import FormatError, constraint_for

PAGE = Path(__file__).with_name("page.html")


@dataclass
class Settings:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_batch_size: int = 8  # the engine's slots: sequences decoded at once
    limits: messages.Limits = None
    max_sessions: int = 8
    session_idle_timeout: float = 600.0
    api_key: str | None = None
    baseline: str | None = None  # a Qwen2.5-VL folder: serve it, converted exactly, on the same engine
    step_budget: int = 4096  # prompt tokens prefilled between two decode steps while others decode

    def __post_init__(self):
        self.limits = self.limits or messages.Limits()


def build_app(settings: Settings, chat: ChatEngine, name: str) -> FastAPI:
    """The routes over a running ``chat`` engine (its thread started by the caller)."""
    app = FastAPI(title="ivl", docs_url=None, redoc_url=None, openapi_url=None)
    limits = settings.limits
    sessions = None if settings.baseline else SessionStore(chat, settings.max_sessions, settings.session_idle_timeout)
    tokenizer, vocab = chat.processor.tokenizer, chat.model.lm.config.vocab_size

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):  # unknown routes and methods, in OpenAI's shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = {
            404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(error.status_code, str(error.detail))
        return JSONResponse(ApiError(message, error.status_code, code=code).body(), status_code=error.status_code)

    @app.middleware("http")
    async def bearer_key(request: Request, call_next):
        """Every /v1 endpoint needs ``Authorization: Bearer <key>`` (compared in constant time); the page and
        /health do not (the page asks for the key and keeps it in the browser, never in a URL)."""
        if settings.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return JSONResponse(
                    ApiError(
                        "missing or wrong API key: send Authorization: Bearer <key>", 401, code="invalid_api_key"
                    ).body(),
                    status_code=401,
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "ivl"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(
                f"The model `{model_id}` does not exist; this server serves `{name}`", 404, "model", "model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = messages.json_body(await request.body(), request.headers.get("content-type"))

        def prepare() -> Prompt:
            def formats(value):
                try:
                    return constraint_for(value, tokenizer, vocab)
                except FormatError as error:
                    raise ApiError(str(error), param=error.param) from None

            return messages.build_prompt(body, chat.processor, limits, chat.count_tokens, formats)

        prompt = await asyncio.to_thread(prepare)
        usage_chunk = messages.parse_stream_options(body)
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sequence = chat.start(prompt, lambda delta: loop.call_soon_threadsafe(out.put_nowait, delta))
        reply = _Reply(body.get("model") or name, prompt.n)
        if body.get("stream"):
            return StreamingResponse(reply.stream(out, chat, sequence, usage_chunk), media_type="text/event-stream")
        return JSONResponse(await reply.complete(out, chat, sequence, request))

    @app.post("/v1/sessions")
    async def session_call(request: Request):
        if sessions is None:
            raise ApiError("live video sessions are not served with --baseline", 404, code="not_found")
        body = messages.json_body(await request.body(), request.headers.get("content-type"))
        try:
            return await _session_call(body, sessions, limits)
        except SessionError as error:
            raise ApiError(str(error), error.status, error.param) from None

    return app


class _Reply:
    """OpenAI's response to one chat request, from the engine's deltas (one or more copies)."""

    def __init__(self, model: str, n: int):
        self.id, self.created, self.model, self.n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, n
        self.prompt_tokens, self.completion = 0, [0] * n

    def usage(self) -> dict:
        done = sum(self.completion)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def _take(self, delta: Delta) -> None:
        self.prompt_tokens, self.completion[delta.index] = delta.prompt_tokens, delta.completion_tokens

    async def complete(self, out: asyncio.Queue, chat: ChatEngine, sequence, request: Request) -> dict:
        texts, finish, logprobs = [""] * self.n, [None] * self.n, [None] * self.n
        while any(f is None for f in finish):
            try:
                delta = await asyncio.wait_for(out.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # the client left: its slots go to others
                    chat.cancel(sequence)
                    return {}
                continue
            if delta.finish_reason == "error":
                chat.cancel(sequence)
                raise ApiError("the model failed on this request", 500, code="server_error")
            self._take(delta)
            texts[delta.index] += delta.text
            finish[delta.index] = delta.finish_reason
            if delta.logprobs is not None:
                logprobs[delta.index] = (logprobs[delta.index] or []) + delta.logprobs
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i], "refusal": None},
                "logprobs": {"content": logprobs[i]} if logprobs[i] is not None else None,
                "finish_reason": finish[i],
            }
            for i in range(self.n)
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, out: asyncio.Queue, chat: ChatEngine, sequence, usage_chunk: bool):
        finished = 0
        try:
            for i in range(self.n):
                yield self._chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    with_usage=usage_chunk,
                )
            while finished < self.n:
                delta = await out.get()
                if delta.finish_reason == "error":
                    yield f"data: {json.dumps(ApiError('the model failed on this request', 500).body())}\n\n"
                    return
                self._take(delta)
                if delta.text or delta.logprobs:
                    yield self._chunk(
                        [
                            {
                                "index": delta.index,
                                "delta": {"content": delta.text},
                                "logprobs": {"content": delta.logprobs} if delta.logprobs else None,
                                "finish_reason": None,
                            }
                        ],
                        with_usage=usage_chunk,
                    )
                if delta.finish_reason is not None:
                    finished += 1
                    yield self._chunk(
                        [{"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason}],
                        with_usage=usage_chunk,
                    )
            if usage_chunk:  # OpenAI's: one more chunk, no choices, the whole request's usage
                yield self._chunk([], self.usage(), with_usage=True)
            yield "data: [DONE]\n\n"
        finally:
            if finished < self.n:  # the client left (or the stream broke): its slots go to others
                chat.cancel(sequence)


SESSION_FIELDS = {
    "open": {"op"},
    "close": {"op", "session"},
    "push": {"op", "session", "frames"},
    "ask": {"op", "session", "question", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"},
}


async def _session_call(body: dict, sessions: SessionStore, limits: messages.Limits) -> dict:
    op = body.get("op")
    if op not in SESSION_FIELDS:
        raise ApiError("a session call is a JSON object with op: open | push | ask | close", param="op")
    messages.check_fields(body, SESSION_FIELDS[op])
    if op == "open":
        return {"session": await asyncio.to_thread(sessions.open)}
    session = sessions.get(body.get("session"))
    if op == "push":
        frames = body.get("frames")
        if not isinstance(frames, list) or not frames:
            raise ApiError(
                "push needs `frames`: a non-empty list of image URLs (data:, http(s), file://)", param="frames"
            )
        if len(frames) > limits.max_frames:
            raise ApiError(f"push at most {limits.max_frames} frames per call; got {len(frames)}", param="frames")

        def load():
            images = [messages.load_image(f, limits, f"frames[{i}]") for i, f in enumerate(frames)]
            return list(messages.frames_array(images, "frames"))

        arrays = await asyncio.to_thread(load)
        await asyncio.wrap_future(session.push(arrays))
        return {"session": body["session"], "frames": session.frames, "cache_bytes": session.nbytes()}
    if op == "ask":
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError("ask needs a non-empty `question`", param="question")
        sampling = messages.parse_sampling(body, limits)
        return {"session": body["session"], **await asyncio.wrap_future(session.ask(question, sampling))}
    sessions.close(body["session"])
    return {"session": body["session"], "closed": True}
