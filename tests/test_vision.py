"""The vision tower's batched window attention against transformers' own layer schedule."""

import pytest
import torch
from references import assert_as_accurate
from teacher import tiny_teacher_config
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ivl.model.vision import WindowBatchedAttention, build_vision_tower, vision_config_dict


@pytest.mark.parametrize(
    "grids",
    [
        [[2, 8, 8]],  # windows tile every frame: one batched call per layer
        [[1, 6, 10], [2, 4, 6], [1, 2, 2]],  # clipped windows at the edges, images and a video of several sizes
    ],
)
def test_batched_window_attention_equals_transformers_tower(grids):
    vision = vision_config_dict(tiny_teacher_config(2).vision_config)
    torch.manual_seed(0)
    ours = build_vision_tower(vision).eval()
    theirs = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        Qwen2_5_VLVisionConfig(**vision), attn_implementation="sdpa"
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    assert all(isinstance(b.attn, WindowBatchedAttention) for b in ours.blocks)
    assert not any(isinstance(b.attn, WindowBatchedAttention) for b in theirs.blocks)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = theirs(pixels, grid_thw=grid).pooler_output
        got = ours(pixels, grid_thw=grid).pooler_output
        exact = theirs.double()(pixels.double(), grid_thw=grid).pooler_output
    assert_as_accurate(got, expected, exact)
