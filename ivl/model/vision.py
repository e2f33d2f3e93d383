"""The vision tower: transformers' Qwen2.5-VL vision transformer and patch merger, used as they are."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

# Keys of a transformers config dict that describe the library, not the tower.
_BOOKKEEPING = {"transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "torch_dtype",
                "id2label", "label2id", "return_dict", "output_hidden_states", "output_attentions",
                "chunk_size_feed_forward", "is_encoder_decoder", "problem_type"}


def vision_config_dict(config: Qwen2_5_VLVisionConfig) -> dict:
    """The tower's own settings from a transformers vision config (what InfiniteVLConfig.vision stores)."""
    return {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}


def build_vision_tower(vision: dict, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised Qwen2.5-VL vision tower: ViT + 2x2 patch merger into the LM width."""
    config = Qwen2_5_VLVisionConfig(**vision)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation=attn_implementation)


def vision_features(tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Merged patch features [sum over items of t*h*w/merge^2, LM hidden] for flattened patches [N, C*t*p*p]."""
    out = tower(pixel_values.to(tower.dtype), grid_thw=grid_thw)
    return out.pooler_output
