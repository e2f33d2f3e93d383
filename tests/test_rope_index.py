"""Multimodal RoPE positions against transformers' Qwen2.5-VL get_rope_index."""

import torch
from teacher import IMAGE, VIDEO, image_video_prompt, tiny_teacher

from ivl.model.rope_index import multimodal_position_ids


def ours(inputs, **kwargs):
    return multimodal_position_ids(
        inputs["input_ids"],
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        spatial_merge_size=2,
        tokens_per_second=2,
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
        **kwargs,
    )


def theirs(teacher, inputs, attention_mask=None):
    return teacher.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
        attention_mask=attention_mask,
    )


def test_positions_match_transformers_for_image_and_video():
    inputs = image_video_prompt(batch=2)
    ref, _ = theirs(tiny_teacher(), inputs)
    pos, next_position = ours(inputs)
    torch.testing.assert_close(pos, ref)
    # the video's temporal axis is spread by tokens_per_second * seconds per patch = 3
    video_t = pos[0, 0, inputs["input_ids"][0] == VIDEO]
    assert set((video_t - video_t.min()).tolist()) == {0, 3}
    assert next_position.tolist() == (pos[0, :, -1] + 1).tolist()


def test_positions_match_transformers_with_left_padding():
    inputs = image_video_prompt(batch=2)
    pad = 3
    for key in ("input_ids", "mm_token_type_ids"):
        inputs[key] = torch.cat([torch.zeros(2, pad, dtype=inputs[key].dtype), inputs[key]], dim=1)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :pad] = 0
    inputs["input_ids"][1, :pad] = 7  # row 1 is not padded: its first tokens are real text
    ref, _ = theirs(tiny_teacher(), inputs, attention_mask=mask)
    pos, _ = ours(inputs, attention_mask=mask)
    torch.testing.assert_close(pos[:, mask.bool()], ref[:, mask.bool()])


def test_packed_samples_restart_at_zero():
    inputs = image_video_prompt(batch=2)
    separate, _ = ours(inputs)
    n = inputs["input_ids"].shape[1]
    packed_inputs = {**inputs, "input_ids": inputs["input_ids"].reshape(1, -1)}
    packed, _ = ours(packed_inputs, cu_seqlens=torch.tensor([0, n, 2 * n], dtype=torch.int32))
    torch.testing.assert_close(packed.reshape(3, 2, n), separate)


def test_placeholder_count_mismatch_names_the_problem():
    inputs = image_video_prompt()
    inputs["video_grid_thw"] = torch.tensor([[2, 4, 8]])
    try:
        ours(inputs)
    except ValueError as err:
        assert "video 0 needs 16 placeholder tokens" in str(err)
    else:
        raise AssertionError("a short placeholder run must be an error")
