"""The vision tower on a stream step: ivl's schedule of Qwen2.5-VL's tower against transformers' own.

Both towers hold the same random weights at the 3B teacher's shapes (bf16) and run one step of a video stream
(``--frames`` frames of ``--frame-size`` pixels, 2 frames per temporal patch). Each is timed over ``--replays``
calls after three untimed ones; "first call", the first of those, includes compiling. Then ivl's tower meets
other image sizes, first call each: compiled once for all sizes, it compiles again only where inductor's choices
depend on a size range.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ivl.model.vision import build_vision_tower, vision_config_dict
from ivl.teachers.qwen2_5_vl import QWEN2_5_VL_3B

OTHER_SIZES = [(2, 224, 224), (2, 252, 280), (2, 308, 336), (4, 364, 196), (2, 644, 476)]  # (frames, height, width)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=64, help="frames per step (even: whole temporal patches)")
    parser.add_argument("--frame-size", type=int, default=448, help="square frame side in pixels (multiple of 28)")
    parser.add_argument("--replays", type=int, default=10)


def _inputs(frames: int, height: int, width: int):
    grid = torch.tensor([[frames // 2, height // 14, width // 14]], device="cuda")
    return torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16), grid


def _timed(tower, pixels, grid, replays: int) -> tuple[float, float, torch.Tensor]:
    """(seconds of the first call, ms per call after it, the output)."""
    start = time.perf_counter()
    tower(pixels, grid_thw=grid)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(2):
        tower(pixels, grid_thw=grid)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        out = tower(pixels, grid_thw=grid).pooler_output
    torch.cuda.synchronize()
    return first, (time.perf_counter() - start) / replays * 1e3, out


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("python -m ivl.bench vision times the tower on a CUDA GPU; none is visible")
    vision = vision_config_dict(Qwen2_5_VLConfig(**QWEN2_5_VL_3B).vision_config)
    with torch.device("cuda"):
        ours = build_vision_tower(vision).to(torch.bfloat16).eval()
        theirs = Qwen2_5_VisionTransformerPretrainedModel._from_config(
            Qwen2_5_VLVisionConfig(**vision), attn_implementation="sdpa"
        )
    theirs = theirs.to(torch.bfloat16).eval()
    theirs.load_state_dict(ours.state_dict())
    pixels, grid = _inputs(args.frames, args.frame_size, args.frame_size)
    print(
        f"# {datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__}: Qwen2.5-VL-3B's tower, "
        f"bf16, {args.frames} frames of {args.frame_size} px ({pixels.shape[0]} patches) per step\n"
    )
    print("| tower | ms per step | ms per frame | first call s | relative difference to transformers' |")
    print("| --- | --- | --- | --- | --- |")
    reference = None
    for label, tower in [("transformers (sdpa, a call per window)", theirs), ("ivl", ours)]:
        first, ms, out = _timed(tower, pixels, grid, args.replays)
        reference = out.float() if reference is None else reference
        diff = ((out.float() - reference).norm() / reference.norm()).item()
        print(f"| {label} | {ms:.1f} | {ms / args.frames:.2f} | {first:.1f} | {diff:.4f} |", flush=True)
    print("\nivl's tower, first call at other sizes:")
    for frames, height, width in OTHER_SIZES:
        first, ms, _ = _timed(ours, *_inputs(frames, height, width), replays=1)
        print(f"- {frames} frames of {height}x{width} px: first call {first:.2f} s, then {ms:.1f} ms", flush=True)
