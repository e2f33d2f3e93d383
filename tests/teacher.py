"""A tiny random Qwen2.5-VL teacher (transformers' own model) and a prompt with an image and a video."""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMAGE, VIDEO, VISION_START, VISION_END = 300, 301, 302, 303
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


def tiny_teacher_config(layers: int = 4) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            bos_token_id=310,
            eos_token_id=311,
            pad_token_id=312,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=True,
    )


def tiny_teacher(layers: int = 4) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_teacher_config(layers), attn_implementation="sdpa")
    return model.float().eval()


def image_video_prompt(text_len: int = 5, batch: int = 1) -> dict:
    """Text, an image (grid 1x4x4 -> 4 tokens), text, a video (grid 2x4x6 -> 12 tokens, 1.5 s per temporal
    patch), text: the inputs transformers' Qwen2.5-VL takes."""
    image_grid = torch.tensor([[1, 4, 4]] * batch)
    video_grid = torch.tensor([[2, 4, 6]] * batch)
    rows = []

    def text(n: int) -> list[int]:
        return torch.randint(0, 300, (n,)).tolist()

    for _ in range(batch):
        rows.append(
            text(text_len)
            + [VISION_START]
            + [IMAGE] * 4
            + [VISION_END]
            + text(3)
            + [VISION_START]
            + [VIDEO] * 12
            + [VISION_END]
            + text(text_len)
        )
    input_ids = torch.tensor(rows)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(batch * 16, PATCH_DIM),
        image_grid_thw=image_grid,
        pixel_values_videos=torch.randn(batch * 48, PATCH_DIM),
        video_grid_thw=video_grid,
        second_per_grid_ts=torch.tensor([1.5] * batch),
        mm_token_type_ids=(input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int(),
    )
