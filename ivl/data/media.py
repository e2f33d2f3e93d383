"""Decoding images (Pillow) and videos (PyAV), with Qwen2.5-VL's frame sampling."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ivl.data.corpus import BadSample, Media

MIN_FRAMES = 4


def load_image(media: Media, source: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(media.data) if media.data is not None else media.path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadSample(f"{source}: image {media.name} not found") from None
    except Exception as err:  # Pillow raises several types for truncated or foreign files
        raise BadSample(f"{source}: image {media.name} cannot be decoded ({type(err).__name__}: {err})") from err


def load_video(media: Media, source: str, fps: float = 2.0, max_frames: int = 64,
               frame_factor: int = 2) -> tuple[np.ndarray, float]:
    """Frames [T, H, W, 3] uint8 sampled uniformly, and the rate they were sampled at (frames per second).

    ``media.options`` may set ``fps`` or ``nframes`` per sample (Qwen2.5-VL message lists do). The frame count is
    a multiple of ``frame_factor`` (the temporal patch), at least 4, at most ``max_frames``.
    """
    import av  # imported here: only video corpora need PyAV

    try:
        container = av.open(io.BytesIO(media.data) if media.data is not None else media.path)
    except FileNotFoundError:
        raise BadSample(f"{source}: video {media.name} not found") from None
    except Exception as err:
        raise BadSample(f"{source}: video {media.name} cannot be opened ({type(err).__name__}: {err})") from err
    try:
        with container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
    except Exception as err:
        raise BadSample(f"{source}: video {media.name} cannot be decoded ({type(err).__name__}: {err})") from err
    if not frames:
        raise BadSample(f"{source}: video {media.name} has no frames")
    total = len(frames)
    duration = total / rate
    if "nframes" in media.options:
        n = int(media.options["nframes"])
    else:
        n = duration * float(media.options.get("fps", fps))
    n = max(MIN_FRAMES, min(max_frames, total if total >= MIN_FRAMES else MIN_FRAMES, int(n)))
    n = max(frame_factor, int(math.floor(n / frame_factor)) * frame_factor)
    index = np.linspace(0, total - 1, n).round().astype(int)
    return np.stack([frames[i] for i in index]), n / duration
