"""Small real media files for data tests: PNG images (Pillow) and H.264 mp4 clips (PyAV)."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, color=(200, 30, 30), size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_video(path: Path, colors, frames_per_color: int = 4, size: int = 64, fps: int = 8) -> Path:
    """A clip showing each color in turn (frames_per_color frames each)."""
    import av  # here: the GPU machines have no PyAV, and their tests need images only

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for color in colors:
            frame = np.zeros((size, size, 3), np.uint8)
            frame[:] = color
            for _ in range(frames_per_color):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
