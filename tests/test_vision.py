"""The vision tower's schedule (batched window attention, compiled block regions, the patch embedding as a product)
against transformers' own tower."""

import pytest
import torch
from references import assert_as_accurate
from teacher import tiny_teacher_config
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ivl.model.vision import PatchEmbedAsProduct, VisionBlock, build_vision_tower, vision_config_dict


@pytest.mark.parametrize(
    "grids",
    [
        [[2, 8, 8]],  # windows tile every frame: one batched call per layer
        [[1, 6, 10], [2, 4, 6], [1, 2, 2]],  # clipped windows at the edges, images and a video of several sizes
    ],
)
def test_scheduled_tower_equals_transformers_tower(grids):
    ours, theirs = _towers("cpu", torch.float32)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = theirs(pixels, grid_thw=grid).pooler_output
        got = ours(pixels, grid_thw=grid).pooler_output
        exact = theirs.double()(pixels.double(), grid_thw=grid).pooler_output
    assert_as_accurate(got, expected, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("grids", [[[4, 16, 16]], [[1, 6, 10], [2, 4, 6]]])
def test_compiled_tower_on_cuda_equals_transformers_tower(grids):
    """On CUDA the fused chains run compiled (bf16, as served); each tower is held to the float64 result."""
    ours, theirs = _towers("cuda", torch.bfloat16)
    grid = torch.tensor(grids, device="cuda")
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda")
    with torch.no_grad():
        expected = theirs(pixels.bfloat16(), grid_thw=grid).pooler_output
        got = ours(pixels.bfloat16(), grid_thw=grid).pooler_output
        exact = theirs.double()(pixels.double(), grid_thw=grid).pooler_output
    assert_as_accurate(got, expected, exact, factor=2.0)


def _towers(device, dtype):
    """ivl's tower and transformers' own with the same random weights (tiny teacher shapes)."""
    vision = vision_config_dict(tiny_teacher_config(2).vision_config)
    torch.manual_seed(0)
    with torch.device(device):
        ours = build_vision_tower(vision).to(dtype).eval()
        theirs = (
            Qwen2_5_VisionTransformerPretrainedModel._from_config(
                Qwen2_5_VLVisionConfig(**vision), attn_implementation="sdpa"
            )
            .to(dtype)
            .eval()
        )
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: randomise them, so that each is read
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.3)
            else:
                p.mul_(5)  # attention far from uniform within each window
    theirs.load_state_dict(ours.state_dict())
    assert all(isinstance(b, VisionBlock) for b in ours.blocks) and isinstance(ours.patch_embed, PatchEmbedAsProduct)
    assert not any(isinstance(m, (VisionBlock, PatchEmbedAsProduct)) for m in theirs.modules())
    return ours, theirs
