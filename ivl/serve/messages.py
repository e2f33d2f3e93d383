"""OpenAI chat requests -> ``Prompt``s, checked completely before anything reaches the engine: every mistake a client
can make is a 4xx in OpenAI's error shape that names the field and says what to fix, and a field OpenAI defines
that this server does not implement is refused by name, never silently ignored.

Media: ``image_url`` parts take a base64 ``data:image/...`` URL, an http(s) URL (fetched with a timeout and a size
limit) or a ``file://`` path under the server's ``--media-root`` (refused without one, and outside it). ``video``
parts take a list of frames given the same ways (``{"type": "video", "video": [url, ...]}``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ivl.serve.engine import Prompt, Sampling

ROLES = ("system", "developer", "user", "assistant")
INT64 = (-(2**63), 2**63 - 1)
# What this server reads of a chat request; anything else OpenAI defines is refused unless neutral.
IMPLEMENTED = {
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "response_format",
}
NEUTRAL = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "user": None,
    "store": (False,),
    "parallel_tool_calls": None,
    "tools": ([],),
    "tool_choice": ("none",),
    "metadata": None,
    "service_tier": ("auto", "default"),
}


class ApiError(Exception):
    """A request the server refuses: HTTP status, a message that says what to fix, and OpenAI's ``param`` and
    ``code``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 1024  # the most new tokens one request may ask for
    max_context: int = 32768  # prompt + new tokens
    max_image_pixels: int = 4096 * 4096  # of a decoded image, before resizing to the model's budget
    max_media_bytes: int = 20 * 2**20  # of one fetched or embedded image
    max_frames: int = 256  # of one video part
    max_n: int = 8  # answers per request
    fetch_timeout: float = 10.0  # seconds, for http(s) media
    media_root: Path | None = None  # where file:// media may come from; None: nowhere


def json_body(raw: bytes, content_type: str | None = "application/json") -> dict:
    """The request body as a JSON object, or 400 as OpenAI answers a body it cannot parse; a body sent as another
    media type (a form, text/plain) is refused the same way, even when it happens to parse."""
    media = (content_type or "").split(";")[0].strip().lower()
    try:
        if media != "application/json":
            raise ValueError
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            "We could not parse the JSON body of your request: send a JSON object with "
            f"Content-Type: application/json (got {media or 'no Content-Type'})"
        ) from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object")
    return body


def check_fields(body: dict, implemented: set[str], neutral: dict | None = None) -> None:
    for key, value in body.items():
        if key in implemented:
            continue
        allowed = (neutral or {}).get(key, ())
        if key in (neutral or {}) and (value is None or allowed is None or value in allowed):
            continue
        raise ApiError(
            f"`{key}` is not supported by this server; leave it out", param=key, code="unsupported_parameter"
        )


def parse_chat(body: dict, limits: Limits) -> tuple[list[dict], list[Image.Image], list[np.ndarray], Sampling]:
    """(messages in the chat template's form, images, videos, sampling) of an OpenAI chat request body."""
    check_fields(body, IMPLEMENTED, NEUTRAL)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("`messages` must be a non-empty list of {role, content}", param="messages")
    out, images, videos = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where} must be an object with `role` and `content`", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"{where}.role must be one of {list(ROLES)}; got {role!r}", param=f"{where}.role")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise ApiError(
                f"{where}.{sorted(unknown)[0]} is not supported by this server",
                param=where,
                code="unsupported_parameter",
            )
        role = "system" if role == "developer" else role
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(f"{at}.text must be a string", param=f"{at}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ApiError(
                        f"{at}.image_url.url must be a string (a data: URL, http(s) or file://)",
                        param=f"{at}.image_url",
                    )
                images.append(load_image(url, limits, at))
                parts.append({"type": "image"})
            elif kind == "video":
                frames = part.get("video")
                if not isinstance(frames, list) or not frames:
                    raise ApiError(f"{at}.video must be a non-empty list of frame URLs", param=f"{at}.video")
                if len(frames) > limits.max_frames:
                    raise ApiError(
                        f"{at}.video has {len(frames)} frames; at most {limits.max_frames}", param=f"{at}.video"
                    )
                videos.append(
                    frames_array([load_image(f, limits, f"{at}.video[{k}]") for k, f in enumerate(frames)], at)
                )
                parts.append({"type": "video"})
            else:
                raise ApiError(f"{at}.type must be one of text, image_url, video; got {kind!r}", param=f"{at}.type")
        out.append({"role": role, "content": parts})
    return out, images, videos, parse_sampling(body, limits)


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not ((low < value if low_open else low <= value) and value <= high)
    ):
        raise ApiError(
            f"`{key}` must be a number from {low} {'(excluded) ' if low_open else ''}to {high}; got {value!r}",
            param=key,
            code="invalid_value",
        )
    return float(value)


def _integer(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(
            f"`{key}` must be an integer from {low} to {high}; got {value!r}", param=key, code="invalid_value"
        )
    return value


def parse_sampling(body: dict, limits: Limits) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, 1, limits.max_tokens)
    seed = _integer(body, "seed", *INT64)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("`stop` must be a non-empty string or a list of at most 4 of them", param="stop")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError("`logprobs` must be true or false", param="logprobs")
    top = _integer(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise ApiError("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    return Sampling(
        max_tokens=min(256, limits.max_tokens) if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, True),
        seed=seed,
        stop=stop,
        logprobs=(top or 0) if logprobs else None,
    )


def parse_n(body: dict, limits: Limits) -> int:
    n = _integer(body, "n", 1, limits.max_n)
    return 1 if n is None else n


def parse_stream_options(body: dict) -> bool:
    """Whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise ApiError("`stream_options` is only allowed with `stream: true`", param="stream_options")
    if (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise ApiError("`stream_options` may only hold `include_usage` (true or false)", param="stream_options")
    return bool(options.get("include_usage"))


def load_image(url: str, limits: Limits, where: str) -> Image.Image:
    """An RGB image from a data URL, an http(s) URL or a file:// path under ``limits.media_root``."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/"):
            raise ApiError(
                f"{where}: a data URL must hold an image (data:image/png;base64,...); got {header[:40]!r}", param=where
            )
        if ";base64" not in header:
            raise ApiError(f"{where}: image data URLs must be base64-encoded", param=where)
        if len(payload) * 3 // 4 > limits.max_media_bytes:
            raise ApiError(f"{where}: the image is larger than {limits.max_media_bytes // 2**20} MiB", 413, where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(f"{where}: the data URL is not valid base64", param=where) from None
    elif scheme in ("http", "https"):
        data = _fetch(url, limits, where)
    elif scheme == "file":
        data = _read_local(url, limits, where)
    else:
        raise ApiError(f"{where}: image URLs must be data:, http(s):// or file://; got {url[:40]!r}", param=where)
    return _decode(data, limits, where)


def _fetch(url: str, limits: Limits, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout) as response:
            data = response.read(limits.max_media_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise ApiError(f"{where}: could not fetch {url[:80]}: {getattr(error, 'reason', error)}", param=where) from None
    if len(data) > limits.max_media_bytes:
        raise ApiError(f"{where}: {url[:80]} is larger than {limits.max_media_bytes // 2**20} MiB", 413, where)
    return data


def _read_local(url: str, limits: Limits, where: str) -> bytes:
    if limits.media_root is None:
        raise ApiError(f"{where}: file:// media is off; start the server with --media-root DIR to allow it", 403, where)
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
    root = limits.media_root.resolve()
    if not path.is_relative_to(root):
        raise ApiError(f"{where}: {path} is outside the media root {root}", 403, where)
    if not path.is_file():
        raise ApiError(f"{where}: no file {path}", 404, where)
    if path.stat().st_size > limits.max_media_bytes:
        raise ApiError(f"{where}: {path.name} is larger than {limits.max_media_bytes // 2**20} MiB", 413, where)
    return path.read_bytes()


def _decode(data: bytes, limits: Limits, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ApiError(
                f"{where}: the image has {width}x{height} pixels; at most {limits.max_image_pixels:,} "
                f"pixels are accepted (resize it)",
                413,
                where,
            )
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(f"{where}: not a readable image (PNG, JPEG, WebP, ...)", param=where) from None


def frames_array(frames: list[Image.Image], where: str) -> np.ndarray:
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ApiError(f"{where}: all frames of a video must have one size; got {sorted(sizes)}", param=where)
    return np.stack([np.asarray(f) for f in frames])


def build_prompt(body: dict, processor, limits: Limits, count_tokens, constraint_for=None) -> Prompt:
    """The request as a ``Prompt``, its length checked against the context (``count_tokens(prompt)``);
    ``constraint_for(response_format)`` turns a response format into the engine's constraint."""
    messages, images, videos, sampling = parse_chat(body, limits)
    n = parse_n(body, limits)
    constraint = constraint_for(body.get("response_format")) if constraint_for is not None else None
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt = Prompt(text, images, videos, sampling, n=n, constraint=constraint)
    tokens = count_tokens(prompt)
    if tokens + sampling.max_tokens > limits.max_context:
        raise ApiError(
            f"the prompt takes {tokens:,} tokens (images and videos included) and max_tokens asks for "
            f"{sampling.max_tokens:,} more: over the model's context of {limits.max_context:,}; send "
            f"fewer or smaller images, or a shorter conversation",
            param="messages",
            code="context_length_exceeded",
        )
    return prompt
