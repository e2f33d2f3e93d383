"""Decoding images (Pillow) and videos (PyAV), with Qwen2.5-VL's frame sampling."""

from __future__ import annotations

import contextlib
import math

import numpy as np
from PIL import Image

from ivl.data.corpus import BadSample, Media

MIN_FRAMES = 4


def image_size(media: Media, source: str) -> tuple[int, int]:
    """(height, width) from the image's header, without decoding its pixels."""
    try:
        with Image.open(media.source()) as image:
            width, height = image.size
            return height, width
    except FileNotFoundError:
        raise BadSample(f"{source}: image {media.name} not found") from None
    except Exception as err:
        raise BadSample(f"{source}: image {media.name} cannot be decoded ({type(err).__name__}: {err})") from err


def load_image(media: Media, source: str) -> Image.Image:
    try:
        with Image.open(media.source()) as image:
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

    Only the kept frames are decoded: the frame count and rate come from the container, and the decoder seeks to
    the keyframe before each kept frame that lies more than ``SEEK_AHEAD`` frames ahead (decoding on otherwise).
    An hour of video costs a few keyframe intervals per kept frame, not 100,000 decoded frames. Containers that do
    not say how many frames they hold are decoded in full.
    """
    with _video_stream(media, source) as (container, stream, rate):
        total = int(stream.frames or 0)
        if total > 0:
            index = _kept(total, rate, media, fps, max_frames, frame_factor)
            frames = _decode_at(container, stream, index, rate)
        else:  # no frame count in the container: decode everything, then pick
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            total = len(decoded)
            if not total:
                raise BadSample(f"{source}: video {media.name} has no frames")
            index = _kept(total, rate, media, fps, max_frames, frame_factor)
            frames = [decoded[i] for i in index]
    if not frames:
        raise BadSample(f"{source}: video {media.name} has no frames")
    return np.stack(frames), len(index) / (total / rate)


def probe_video(media: Media, source: str, fps: float = 2.0, max_frames: int = 64,
                frame_factor: int = 2) -> tuple[int, int, int]:
    """(frames ``load_video`` keeps, frame height, frame width), from the container's header: nothing decoded,
    unless the container does not say how many frames it holds (then they are counted by decoding)."""
    with _video_stream(media, source) as (container, stream, rate):
        total = int(stream.frames or 0) or sum(1 for _ in container.decode(stream))
        height, width = stream.codec_context.height, stream.codec_context.width
    if not total:
        raise BadSample(f"{source}: video {media.name} has no frames")
    return len(_kept(total, rate, media, fps, max_frames, frame_factor)), height, width


@contextlib.contextmanager
def _video_stream(media: Media, source: str):
    """(container, its first video stream, frame rate); opening or decoding errors become one BadSample line."""
    import av  # imported here: only video corpora need PyAV

    try:
        container = av.open(media.source())
    except FileNotFoundError:
        raise BadSample(f"{source}: video {media.name} not found") from None
    except Exception as err:
        raise BadSample(f"{source}: video {media.name} cannot be opened ({type(err).__name__}: {err})") from err
    try:
        with container:
            stream = container.streams.video[0]
            yield container, stream, float(stream.average_rate or stream.guessed_rate or 25)
    except BadSample:
        raise
    except Exception as err:
        raise BadSample(f"{source}: video {media.name} cannot be decoded ({type(err).__name__}: {err})") from err


SEEK_AHEAD = 32
"""Frames ahead of the decoder beyond which seeking (to the keyframe before) beats decoding on."""


def _kept(total: int, rate: float, media: Media, fps: float, max_frames: int, frame_factor: int) -> list[int]:
    """Indices of the frames to keep among ``total`` (Qwen2.5-VL's sampling: uniform, ``fps`` per second or
    ``nframes``, a multiple of ``frame_factor`` between 4 and ``max_frames``)."""
    duration = total / rate
    if "nframes" in media.options:
        n = int(media.options["nframes"])
    else:
        n = duration * float(media.options.get("fps", fps))
    n = max(MIN_FRAMES, min(max_frames, total if total >= MIN_FRAMES else MIN_FRAMES, int(n)))
    n = max(frame_factor, int(math.floor(n / frame_factor)) * frame_factor)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def _decode_at(container, stream, index: list[int], rate: float) -> list[np.ndarray]:
    """The frames at presentation indices ``index`` (ascending, repeats allowed), decoding as little as possible.
    A frame's index is read from its timestamp (frame pts x rate), so it does not depend on where decoding
    started; past the end, the last frame stands in."""
    base, time_base = stream.start_time or 0, stream.time_base
    found: dict[int, np.ndarray] = {}
    frames = None
    position = -1  # index of the last decoded frame
    last = None
    for target in sorted(set(index)):
        if frames is None or target - position > SEEK_AHEAD:
            container.seek(base + int(target / rate / time_base), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            position = -1
        for frame in frames:
            position = round(float((frame.pts - base) * time_base) * rate) if frame.pts is not None else position + 1
            last = frame
            if position >= target:
                break
        if last is None:
            break
        found[target] = last.to_ndarray(format="rgb24")
    if not found:
        return []
    return [found.get(i, found[max(found)]) for i in index]
