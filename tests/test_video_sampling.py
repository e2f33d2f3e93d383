"""Sampling video frames by seeking: the same frames, pixel for pixel, as decoding every frame and picking."""

import random

import av
import numpy as np
import pytest

import ivl.data.media as media_module
from ivl.data.corpus import Media
from ivl.data.demo import _clip
from ivl.data.media import load_video


def decode_all_then_pick(path, n):
    """The reference: every frame decoded in order, then Qwen2.5-VL's uniform pick of n."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    index = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return np.stack([frames[i] for i in index])


def long_clip(path, frames=300, fps=30, gop=10, size=48):
    """Each frame's content encodes its number (so a wrong frame cannot pass); a keyframe every ``gop`` frames."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "10"}
        for i in range(frames):
            frame = noise.copy()
            frame[:, : (i % size) + 1] += 120
            frame[: (i // size) + 1, :] += 60
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("seek_ahead", [0, 4, 1000])
@pytest.mark.parametrize("n", [4, 8, 64])
def test_seeking_keeps_the_frames_decoding_everything_keeps(tmp_path, monkeypatch, seek_ahead, n):
    monkeypatch.setattr(media_module, "SEEK_AHEAD", seek_ahead)
    path = long_clip(tmp_path / "long.mp4")
    frames, rate = load_video(Media("video", path=str(path), options={"nframes": n}), "test", max_frames=64)
    assert np.array_equal(frames, decode_all_then_pick(path, n))
    assert rate == pytest.approx(n / 10.0)  # n frames over 300 frames at 30 fps


def test_demo_clips_sample_as_before(tmp_path):
    for i in range(3):
        path = tmp_path / f"clip{i}.mp4"
        _clip(path, ["red", "green", "blue"][: 2 + i % 2], random.Random(i))
        frames, _ = load_video(Media("video", path=str(path)), "test", fps=2.0, max_frames=8)
        assert np.array_equal(frames, decode_all_then_pick(path, len(frames)))


def test_bytes_from_a_shard_sample_the_same(tmp_path):
    path = long_clip(tmp_path / "long.mp4", frames=120)
    from_file, _ = load_video(Media("video", path=str(path), options={"nframes": 8}), "test")
    from_bytes, _ = load_video(Media("video", data=path.read_bytes(), options={"nframes": 8}), "test")
    assert np.array_equal(from_file, from_bytes)


def test_seeking_decodes_a_few_keyframe_intervals_not_the_whole_video(tmp_path, monkeypatch):
    path = long_clip(tmp_path / "long.mp4", frames=600, gop=10)
    decoded = []
    real_open = av.open

    class Counting:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    frames, _ = load_video(Media("video", path=str(path), options={"nframes": 4}), "test")
    assert len(frames) == 4 and len(decoded) <= 4 * 10 + 4  # at most one keyframe interval per kept frame


@pytest.mark.parametrize("frames, expected_side", [(8, 112), (2, 224)])
def test_a_video_shares_one_pixel_budget_across_its_frames(frames, expected_side):
    """Qwen2.5-VL's total budget, counted per temporal patch of 2 frames: under 28*28*64 pixels, 8 frames of
    224x224 get 50,176 / 8 * 2 = 12,544 pixels each (112x112); 2 frames keep their 224x224."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from ivl.data.processing import Processor

    processor = Processor(
        Processor.from_pretrained().tokenizer, video_min_pixels=28 * 28 * 4, video_total_pixels=28 * 28 * 64
    )
    budget = processor.frame_size(frames)["longest_edge"]
    assert budget == min(768 * 28 * 28, max(28 * 28 * 64 / frames * 2, int(28 * 28 * 4 * 1.05)))
    h, w = smart_resize(224, 224, factor=28, min_pixels=28 * 28 * 4, max_pixels=budget)
    assert h == w == expected_side
    grid = processor.videos([np.zeros((frames, 224, 224, 3), np.uint8)])["video_grid_thw"].tolist()
    assert grid == [[frames // 2, h // 14, w // 14]]
