"""OpenAI chat requests -> ``Prompt``s, with every mistake a client can make answered by a 4xx that says what to
fix (LitServe checks the JSON shape; the parts, media and limits are checked here, before anything is queued).

Media: ``image_url`` parts take a base64 ``data:image/...`` URL, an http(s) URL (fetched with a timeout and a size
limit) or a ``file://`` path under the server's ``--media-root`` (refused without one, and outside it). ``video``
parts take a list of frames given the same ways (``{"type": "video", "video": [url, ...]}``).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from ivl.serve.engine import Prompt, Sampling

ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    max_tokens: int = 1024  # the most new tokens one request may ask for
    max_context: int = 32768  # prompt + new tokens
    max_image_pixels: int = 4096 * 4096  # of a decoded image, before resizing to the model's budget
    max_media_bytes: int = 20 * 2**20  # of one fetched or embedded image
    max_frames: int = 256  # of one video part
    fetch_timeout: float = 10.0  # seconds, for http(s) media
    media_root: Path | None = None  # where file:// media may come from; None: nowhere


def bad_request(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def parse_chat(body: dict, limits: Limits) -> tuple[list[dict], list[Image.Image], list[np.ndarray], Sampling]:
    """(messages in the chat template's form, images, videos, sampling) of an OpenAI chat request body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content}")
    out, images, videos = [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object with `role` and `content`")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {list(ROLES)}; got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.text must be a string")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise bad_request(f"{where}.image_url.url must be a string (a data: URL, http(s) or file://)")
                images.append(load_image(url, limits, where))
                parts.append({"type": "image"})
            elif kind == "video":
                frames = part.get("video")
                if not isinstance(frames, list) or not frames:
                    raise bad_request(f"{where}.video must be a non-empty list of frame URLs")
                if len(frames) > limits.max_frames:
                    raise bad_request(f"{where}.video has {len(frames)} frames; at most {limits.max_frames}")
                videos.append(frames_array([load_image(f, limits, f"{where}.video[{k}]")
                                            for k, f in enumerate(frames)], where))
                parts.append({"type": "video"})
            else:
                raise bad_request(f"{where}.type must be one of text, image_url, video; got {kind!r}")
        out.append({"role": role, "content": parts})
    return out, images, videos, parse_sampling(body, limits)


def parse_sampling(body: dict, limits: Limits) -> Sampling:
    max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None),
                      min(256, limits.max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limits.max_tokens:
        raise bad_request(f"max_tokens must be an integer from 1 to {limits.max_tokens}; got {max_tokens!r}")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be a number from 0 to 2; got {temperature!r}")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise bad_request(f"top_p must be a number in (0, 1]; got {top_p!r}")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_request(f"seed must be an integer; got {seed!r}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of at most 4 of them")
    if body.get("n", 1) not in (1, None):
        raise bad_request("n must be 1 (one answer per request)")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed, stop=stop)


def load_image(url: str, limits: Limits, where: str) -> Image.Image:
    """An RGB image from a data URL, an http(s) URL or a file:// path under ``limits.media_root``."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/"):
            raise bad_request(f"{where}: a data URL must hold an image (data:image/png;base64,...); got "
                              f"{header[:40]!r}")
        if ";base64" not in header:
            raise bad_request(f"{where}: image data URLs must be base64-encoded")
        if len(payload) * 3 // 4 > limits.max_media_bytes:
            raise bad_request(f"{where}: the image is larger than {limits.max_media_bytes // 2**20} MiB", 413)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL is not valid base64") from None
    elif scheme in ("http", "https"):
        data = _fetch(url, limits, where)
    elif scheme == "file":
        data = _read_local(url, limits, where)
    else:
        raise bad_request(f"{where}: image URLs must be data:, http(s):// or file://; got {url[:40]!r}")
    return _decode(data, limits, where)


def _fetch(url: str, limits: Limits, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout) as response:
            data = response.read(limits.max_media_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise bad_request(f"{where}: could not fetch {url[:80]}: {getattr(error, 'reason', error)}") from None
    if len(data) > limits.max_media_bytes:
        raise bad_request(f"{where}: {url[:80]} is larger than {limits.max_media_bytes // 2**20} MiB", 413)
    return data


def _read_local(url: str, limits: Limits, where: str) -> bytes:
    if limits.media_root is None:
        raise bad_request(f"{where}: file:// media is off; start the server with --media-root DIR to allow it",
                          403)
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
    root = limits.media_root.resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"{where}: {path} is outside the media root {root}", 403)
    if not path.is_file():
        raise bad_request(f"{where}: no file {path}", 404)
    if path.stat().st_size > limits.max_media_bytes:
        raise bad_request(f"{where}: {path.name} is larger than {limits.max_media_bytes // 2**20} MiB", 413)
    return path.read_bytes()


def _decode(data: bytes, limits: Limits, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise bad_request(f"{where}: the image has {width}x{height} pixels; at most {limits.max_image_pixels:,} "
                              f"pixels are accepted (resize it)", 413)
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise bad_request(f"{where}: not a readable image (PNG, JPEG, WebP, ...)") from None


def frames_array(frames: list[Image.Image], where: str) -> np.ndarray:
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise bad_request(f"{where}: all frames of a video must have one size; got {sorted(sizes)}")
    return np.stack([np.asarray(f) for f in frames])


def build_prompt(body: dict, processor, limits: Limits, count_tokens) -> Prompt:
    """The request as a ``Prompt``, its length checked against the context (``count_tokens(prompt)``)."""
    messages, images, videos, sampling = parse_chat(body, limits)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt = Prompt(text, images, videos, sampling)
    tokens = count_tokens(prompt)
    if tokens + sampling.max_tokens > limits.max_context:
        raise bad_request(f"the prompt takes {tokens:,} tokens (images and videos included) and max_tokens asks for "
                          f"{sampling.max_tokens:,} more: over the model's context of {limits.max_context:,}; send "
                          f"fewer or smaller images, or a shorter conversation")
    return prompt
