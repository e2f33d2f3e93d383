"""Token counts of a corpus's samples, for packing, without decoding a pixel: images from their headers, videos
from their containers' frame counts and sizes, text through the tokenizer in batches. Each count is the length
``SampleEncoder`` gives the sample (0 where it would reject it), so packs planned from them are the packs the
encoded samples fill.

Counts are cached next to the first corpus file (``.ivl-cache/``, or ``~/.cache/ivl`` where that is not
writable), keyed by the corpus files (path, size, modification time) and every setting a count depends on; under
several processes each rank counts its share and the shares are gathered.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ivl.data.corpus import BadSample, Sample
from ivl.data.encoding import SampleEncoder
from ivl.data.media import image_size, probe_video
from ivl.data.processing import IMAGE_PAD, VIDEO_PAD

BATCH = 512  # samples tokenized together


def sample_lengths(samples: list[Sample], encoder: SampleEncoder, desc: str = "counting tokens") -> list[int]:
    """The token count of every sample as ``encoder`` would encode it; 0 for a sample it would reject."""
    out, headers = [], {}
    for start in tqdm(range(0, len(samples), BATCH), desc=desc, leave=False, unit_scale=BATCH):
        chunk = samples[start:start + BATCH]
        texts = [_expanded_text(s, encoder, headers) for s in chunk]
        good = [t for t in texts if t is not None]
        ids = iter(encoder.processor.tokenizer(good)["input_ids"]) if good else iter(())  # as Processor calls it
        for sample, text in zip(chunk, texts):
            out.append(0 if text is None else _length(next(ids), sample, encoder))
    return out


def _expanded_text(sample: Sample, encoder: SampleEncoder, headers: dict) -> str | None:
    """The chat text with each image/video placeholder repeated once per merged patch; None if a medium is
    unreadable. ``headers`` remembers what each file on disk holds (corpora reuse images)."""
    processor = encoder.processor
    try:
        image_grids, video_grids = [], []
        for m in sample.media:
            key = (m.kind, m.path, tuple(sorted(m.options.items()))) if m.data is None and m.member is None else None
            if key is not None and key in headers:
                grid = headers[key]
            elif m.kind == "image":
                grid = processor.image_grid(*image_size(m, sample.source))
            else:
                frames, height, width = probe_video(m, sample.source, encoder.video_fps, encoder.video_max_frames,
                                                    processor.temporal_patch_size)
                grid = processor.video_grid(frames, height, width)
            if key is not None:
                headers[key] = grid
            (image_grids if m.kind == "image" else video_grids).append(grid)
        texts = [processor.apply_chat_template(sample.messages)]
        for placeholder, grids, name in ((IMAGE_PAD, image_grids, "image"), (VIDEO_PAD, video_grids, "video")):
            if grids:
                texts = processor._expand(texts, placeholder, torch.tensor(grids), name)
        return texts[0]
    except (BadSample, ValueError):
        return None


def _length(ids: list[int], sample: Sample, encoder: SampleEncoder) -> int:
    if len(ids) <= encoder.max_tokens:
        return len(ids)
    ids = torch.tensor(ids)
    try:
        ids, _ = encoder._truncate(ids, encoder._answer_labels(ids), sample.source)
    except BadSample:
        return 0
    return len(ids)


# ---- the cache ----------------------------------------------------------------------------------------------

def cache_key(files: list[Path], encoder: SampleEncoder, extra: dict) -> str:
    processor = encoder.processor
    settings = {
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "image_size": processor.image_size, "video_size": processor.video_size,
        "video_total_pixels": processor.video_total_pixels, "merge": processor.merge_size,
        "temporal_patch": processor.temporal_patch_size, "patch": processor.image_processor.patch_size,
        "template": hashlib.sha256(processor.chat_template.encode()).hexdigest(),
        "vocab": len(processor.tokenizer), "tokenizer": getattr(processor.tokenizer, "name_or_path", ""),
        "max_tokens": encoder.max_tokens, "truncation": encoder.truncation, "fps": encoder.video_fps,
        "max_frames": encoder.video_max_frames, **extra,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(files: list[Path], key: str) -> Path:
    folder = files[0].parent / ".ivl-cache"
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder / f"lengths-{key}.json"
    except OSError:
        pass
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ivl"
    home.mkdir(parents=True, exist_ok=True)
    return home / f"lengths-{key}.json"


def cached_lengths(samples: list[Sample], encoder: SampleEncoder, files: list[Path], extra: dict,
                   desc: str = "counting tokens") -> list[int]:
    """``sample_lengths`` through the cache; each rank counts every world-th sample and the counts are gathered."""
    key = cache_key(files, encoder, extra)
    path = cache_path(files, key)
    if path.is_file():
        cached = json.loads(path.read_text())
        if len(cached) == len(samples):
            return cached
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    mine = sample_lengths(samples[rank::world], encoder, desc)
    if distributed:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
    else:
        shares = [mine]
    lengths = [0] * len(samples)
    for r, share in enumerate(shares):
        lengths[r::world] = share
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(lengths))
        tmp.replace(path)
    return lengths
