"""The server: an OpenAI-compatible chat API and live video sessions on LitServe, and a web page.

LitServe runs the model in a worker process and the HTTP endpoints in an API process. Chat requests are checked
and turned into prompts in the API process (so that bad input gets its 4xx before anything is queued), then
queued to the worker, where ``Batcher`` groups whatever requests are waiting into one batch for ``Engine``.
LitServe's own OpenAI spec is used for its plumbing only: its request model would drop ``seed`` and reject
``video`` parts, and its responses always say ``finish_reason: "stop"``, so the endpoint's body, the SSE chunks
and the final response are ours. A client that disconnects mid-stream sends its request a cancel through the
same queue: the worker drops the row from the batch and its cache.

Video sessions are a second LitAPI (``POST /v1/sessions``, one JSON body per call: ``{"op": "open"}``,
``{"op": "push", "session": id, "frames": [data URL, ...]}``, ``{"op": "ask", "session": id, "question": ...}``,
``{"op": "close", "session": id}``) with its own worker and model copy, holding the sessions' caches.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import litserve as ls
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from litserve.specs.openai import OpenAISpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from ivl.serve import messages
from ivl.serve.engine import Engine, Prompt
from ivl.serve.loading import load, model_name, resolve
from ivl.serve.sessions import SessionError, SessionStore

PAGE = Path(__file__).with_name("page.html")


@dataclass
class Settings:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_batch_size: int = 8
    limits: messages.Limits = None
    max_sessions: int = 8
    session_idle_timeout: float = 600.0
    api_key: str | None = None
    baseline: str | None = None  # a Qwen2.5-VL folder: serve transformers' model instead (benchmarks)

    def __post_init__(self):
        self.limits = self.limits or messages.Limits()


@dataclass
class ChatJob:
    """What crosses to the worker: a prompt to answer, or the id of one to cancel."""

    request_id: str
    prompt: Prompt | None = None
    cancel: bool = False
    n: int = 1  # LitServe's plumbing reads these two
    stream: bool = True

    def model_copy(self):
        return self


# ---- the worker side ----------------------------------------------------------------------------------------

class Batcher:
    """A thread that runs the engine over batches of whatever requests are waiting (up to ``max_batch_size``),
    delivering each request's deltas to its asyncio queue."""

    def __init__(self, engine: Engine, max_batch_size: int):
        self.engine, self.max_batch_size = engine, max_batch_size
        self.waiting: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()
        threading.Thread(target=self._run, daemon=True, name="ivl-batcher").start()

    def submit(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        out: asyncio.Queue = asyncio.Queue()
        self.waiting.put((job, loop, out))
        return out

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def _run(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            gone = [b for b in batch if b[0].request_id in self.cancelled]  # left before they started
            for job, loop, out in gone:
                self.cancelled.discard(job.request_id)
                loop.call_soon_threadsafe(out.put_nowait, None)
            batch = [b for b in batch if b not in gone]
            if not batch:
                continue
            ids = [job.request_id for job, _, _ in batch]
            try:
                for step in self.engine.generate([job.prompt for job, _, _ in batch],
                                                 cancelled=lambda i: ids[i] in self.cancelled):
                    for (job, loop, out), delta in zip(batch, step):
                        if delta is not None:
                            loop.call_soon_threadsafe(out.put_nowait, delta)
            except Exception as error:  # one bad batch must not stop the server
                for _, loop, out in batch:
                    loop.call_soon_threadsafe(out.put_nowait, error)
            for _, loop, out in batch:
                loop.call_soon_threadsafe(out.put_nowait, None)
            self.cancelled.difference_update(ids)


class ChatAPI(ls.LitAPI):
    def __init__(self, settings: Settings):
        super().__init__(spec=ChatSpec(settings), enable_async=True)
        self.settings = settings

    def setup(self, device):
        if self.settings.baseline:
            from ivl.serve.baseline import TransformersEngine

            engine = TransformersEngine.from_pretrained(self.settings.baseline, self.settings.device,
                                                        self.settings.dtype)
        else:
            model, processor, _ = load(self.settings.model, self.settings.device, self.settings.dtype)
            engine = Engine(model, processor, self.settings.limits.max_context)
        self.batcher = Batcher(engine, self.settings.max_batch_size)

    async def decode_request(self, request: ChatJob, **kwargs) -> ChatJob:
        return request

    async def predict(self, job: ChatJob, **kwargs):
        if job.cancel:
            self.batcher.cancel(job.request_id)
            return
        out = self.batcher.submit(job, asyncio.get_running_loop())
        while (delta := await out.get()) is not None:
            if isinstance(delta, Exception):
                raise delta
            yield delta

    async def encode_response(self, deltas, **kwargs):
        async for delta in deltas:
            yield {"text": delta.text, "finish_reason": delta.finish_reason, "prompt_tokens": delta.prompt_tokens,
                   "completion_tokens": delta.completion_tokens}


# ---- the API side ---------------------------------------------------------------------------------------------

class ChatSpec(OpenAISpec):
    """``POST /v1/chat/completions``: our request checking and OpenAI responses over LitServe's queues."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self._processor = None
        self.model_name = Path(settings.baseline).name if settings.baseline else model_name(settings.model)

    def pre_setup(self, lit_api):
        self.add_endpoint(self.api_path, self.chat_completion, ["POST"])

    def populate_context(self, context, request):
        pass

    @property
    def processor(self):
        if self._processor is None:  # the tokenizer and image processor, in the API process
            from ivl.data.processing import Processor

            folder = Path(self.settings.baseline) if self.settings.baseline else resolve(self.settings.model)
            self._processor = Processor.from_pretrained(
                folder if folder and (folder / "tokenizer_config.json").is_file() else None)
        return self._processor

    def _count_tokens(self, prompt: Prompt) -> int:
        return int(self.processor(prompt.text, images=prompt.images or None, videos=prompt.videos or None)
                   ["input_ids"].shape[1])

    async def chat_completion(self, request: Request, background_tasks: BackgroundTasks):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HTTPException(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the request body must be a JSON object with `messages`")
        prompt = await asyncio.to_thread(messages.build_prompt, body, self.processor, self.settings.limits,
                                         self._count_tokens)
        job = ChatJob(uuid.uuid4().hex, prompt)
        chunks = self._enqueue(job)
        model = body.get("model") or self.model_name
        if body.get("stream"):
            return StreamingResponse(self._stream(job, chunks, model), media_type="text/event-stream",
                                     background=background_tasks)
        return await self._complete(chunks, model)

    def _enqueue(self, job: ChatJob):
        uid = uuid.uuid4()
        q, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return self._responses(uid, q, event)

    async def _responses(self, uid, q, event):
        try:
            async for data, status in self.data_streamer(q, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise data if isinstance(data, HTTPException) else HTTPException(500, "the model worker failed")
                if status == LitAPIStatus.OK and data:
                    yield json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)

    async def _stream(self, job: ChatJob, chunks, model: str):
        cid, created, finished = f"chatcmpl-{job.request_id}", int(time.time()), False
        usage = None

        def chunk(delta: dict, finish=None, usage=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for part in chunks:
                usage = _usage(part)
                if part["text"]:
                    yield chunk({"content": part["text"]})
                if part["finish_reason"]:
                    finished = True
                    yield chunk({}, part["finish_reason"], usage)
            yield "data: [DONE]\n\n"
        except HTTPException as error:
            yield f"data: {json.dumps({'error': {'message': error.detail, 'code': error.status_code}})}\n\n"
        finally:
            if not finished:  # the client left (or the stream broke): free its row in the batch
                asyncio.ensure_future(_drain(self._enqueue(ChatJob(job.request_id, cancel=True))))

    async def _complete(self, chunks, model: str) -> JSONResponse:
        text, finish, usage = [], None, None
        async for part in chunks:
            text.append(part["text"])
            finish, usage = part["finish_reason"] or finish, _usage(part)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                         "finish_reason": finish}],
            "usage": usage})


async def _drain(responses) -> None:
    async for _ in responses:
        pass


def _usage(part: dict) -> dict:
    return {"prompt_tokens": part["prompt_tokens"], "completion_tokens": part["completion_tokens"],
            "total_tokens": part["prompt_tokens"] + part["completion_tokens"]}


# ---- live video sessions -----------------------------------------------------------------------------------------

class SessionAPI(ls.LitAPI):
    def __init__(self, settings: Settings):
        super().__init__(api_path="/v1/sessions")
        self.settings = settings

    def setup(self, device):
        model, processor, _ = load(self.settings.model, self.settings.device, self.settings.dtype)
        self.store = SessionStore(model, processor, self.settings.max_sessions, self.settings.session_idle_timeout)

    def decode_request(self, request) -> dict:
        if not isinstance(request, dict) or request.get("op") not in ("open", "push", "ask", "close"):
            raise HTTPException(400, "a session call is a JSON object with op: open | push | ask | close")
        return request

    def predict(self, call: dict) -> dict:
        try:
            return self._call(call)
        except SessionError as error:
            raise HTTPException(error.status, str(error)) from None

    def _call(self, call: dict) -> dict:
        op, limits = call["op"], self.settings.limits
        if op == "open":
            return {"session": self.store.open()}
        session = self.store.get(call.get("session"))
        if op == "push":
            frames = call.get("frames")
            if not isinstance(frames, list) or not frames:
                raise SessionError("push needs `frames`: a non-empty list of image URLs (data:, http(s), file://)")
            if len(frames) > limits.max_frames:
                raise SessionError(f"push at most {limits.max_frames} frames per call; got {len(frames)}")
            images = [messages.load_image(f, limits, f"frames[{i}]") for i, f in enumerate(frames)]
            session.push(list(messages.frames_array(images, "frames")))
            return {"session": call["session"], "frames": session.frames, "cache_bytes": session.nbytes()}
        if op == "ask":
            question = call.get("question")
            if not isinstance(question, str) or not question.strip():
                raise SessionError("ask needs a non-empty `question`")
            sampling = messages.parse_sampling({k: v for k, v in call.items() if k not in ("op", "session")},
                                               limits)
            return {"session": call["session"], **session.ask(question, sampling)}
        self.store.close(call["session"])
        return {"session": call["session"], "closed": True}

    def encode_response(self, output: dict) -> dict:
        return output


# ---- the server ---------------------------------------------------------------------------------------------------

class BearerAuth:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer <key>`` (the page may pass
    ``?key=<key>`` instead, since a browser cannot set headers on a page load)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode()
        query = scope.get("query_string", b"").decode()
        if given == f"Bearer {self.key}" or (scope["path"] == "/" and f"key={self.key}" in query.split("&")):
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": {"message": "missing or wrong API key: send Authorization: Bearer <key>",
                                           "code": 401}}, status_code=401)
        await response(scope, receive, send)


def build_server(settings: Settings) -> ls.LitServer:
    middlewares = [(BearerAuth, {"key": settings.api_key})] if settings.api_key else []
    accelerator = "cuda" if settings.device.startswith("cuda") else "cpu"
    apis = [ChatAPI(settings)] if settings.baseline else [ChatAPI(settings), SessionAPI(settings)]
    server = ls.LitServer(apis, accelerator=accelerator, devices=1, timeout=False, middlewares=middlewares)
    name = Path(settings.baseline).name if settings.baseline else model_name(settings.model)
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]

    @server.app.exception_handler(HTTPException)
    async def openai_error(request, error: HTTPException):  # the error shape OpenAI's clients read
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": error.detail, "type": kind, "code": error.status_code}},
                            status_code=error.status_code)

    @server.app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @server.app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ivl"}]}

    return server
