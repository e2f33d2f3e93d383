"""The offline Qwen2.5-VL processor: real tokenizer, Qwen2-VL chat format, image and video patches."""

import numpy as np
import pytest
import torch

from ivl.data import Processor
from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained()


def test_bundled_tokenizer_is_qwen2_5(processor):
    tok = processor.tokenizer
    assert tok("Hello world!")["input_ids"] == [9707, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]) == [151652, 151655, 151656]


def test_chat_template_is_qwen2_vl_chatml(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the cats."}]},
        {"role": "assistant", "content": "Two."},
    ]
    assert processor.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Count the cats.<|im_end|>\n"
        "<|im_start|>assistant\nTwo.<|im_end|>\n"
    )


def test_image_placeholders_expand_to_merged_patches(processor):
    image = np.random.randint(0, 255, (280, 420, 3), dtype=np.uint8)
    out = processor("<|vision_start|><|image_pad|><|vision_end|>hi", images=[image])
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert out["pixel_values"].shape == (h * w, 3 * 2 * 14 * 14)
    assert int((out["input_ids"] == 151655).sum()) == h * w // 4
    # the aspect ratio survives the dynamic resize (to a multiple of 28 pixels)
    assert (h, w) == (20, 30)  # 280 x 420 pixels is already within the pixel budget


def test_still_video_equals_the_image_of_its_frame(processor):
    """An image is a temporal patch of one frame shown twice: a 2-frame video of one frame must match it."""
    frame = np.random.randint(0, 255, (84, 112, 3), dtype=np.uint8)
    small = Processor(
        processor.tokenizer,
        image_min_pixels=84 * 112,
        image_max_pixels=84 * 112,
        video_min_pixels=84 * 112,
        video_max_pixels=84 * 112,
    )
    video = small.videos([np.stack([frame, frame])], fps=2.0)
    image = small.images([frame])
    torch.testing.assert_close(video["pixel_values_videos"], image["pixel_values"])
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    assert video["second_per_grid_ts"].tolist() == [1.0]


def test_video_frames_fill_temporal_patches_in_order(processor):
    small = Processor(processor.tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    frames = np.stack([np.full((56, 56, 3), 40 * i, dtype=np.uint8) for i in range(3)])  # odd: last is repeated
    out = small.videos([frames], fps=4.0)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    patches = out["pixel_values_videos"].view(2, 16, 3, 2, 14 * 14)  # [t, patches, C, frame in patch, pixels]
    levels = patches[:, 0, 0, :, 0]  # first pixel, red channel, per temporal patch and frame
    assert levels[0, 0] < levels[0, 1] < levels[1, 0] == levels[1, 1]
    assert out["second_per_grid_ts"].tolist() == [0.5]


def test_placeholder_and_media_counts_must_agree(processor):
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="holds 2 <\\|image_pad\\|> placeholders but 1 images"):
        processor("<|image_pad|> and <|image_pad|>", images=[image])
    with pytest.raises(ValueError, match="no videos were given"):
        processor("<|video_pad|>")


def test_processor_output_runs_through_infinitevl(processor):
    """End to end: chat messages with an image and a video -> processor -> a tiny InfiniteVL -> text."""
    config = InfiniteVLConfig(
        text=HybridConfig.tiny(vocab_size=151936),
        vision=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
        ),
    )
    model = InfiniteVL(config).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    small = Processor(processor.tokenizer, image_max_pixels=56 * 56, video_max_pixels=56 * 56, video_min_pixels=3136)
    inputs = small(
        [text, "<|vision_start|><|image_pad|><|vision_end|>hi"],
        images=[np.zeros((60, 60, 3), np.uint8)] * 2,
        videos=[np.zeros((4, 60, 60, 3), np.uint8)],
    )
    assert inputs["attention_mask"][1, 0] == 0  # left padding
    tokens = model.generate(**inputs, max_new_tokens=3)
    assert tokens.shape[0] == 2 and isinstance(processor.decode(tokens)[0], str)


def test_save_and_reload_keeps_template_and_pixel_budget(processor, tmp_path):
    custom = Processor(processor.tokenizer, chat_template="{{ messages[0]['content'] }}!", image_max_pixels=56 * 56)
    custom.save_pretrained(tmp_path)
    again = Processor.from_pretrained(tmp_path)
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    image = np.zeros((280, 280, 3), dtype=np.uint8)
    assert again.images([image])["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_a_saved_model_folder_loads_its_tokenizer_without_transformers_warning_about_its_type(tmp_path):
    """AutoTokenizer opens the folder's config.json (model_type "infinitevl") too; transformers knows the type, so
    it loads it without "You are using a model of type `infinitevl` to instantiate a model of type ``"."""
    import logging

    from transformers import AutoConfig

    model = InfiniteVL(
        InfiniteVLConfig(
            text=HybridConfig.tiny(vocab_size=151936),
            vision=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                fullatt_block_indexes=[0],
            ),
        )
    )
    model.save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.configuration_utils")
    logger.addHandler(handler)
    try:
        processor = Processor.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert processor.tokenizer("Hello world!")["input_ids"] == [9707, 1879, 0]
    assert not [r.getMessage() for r in records if "model of type" in r.getMessage()]
    assert AutoConfig.from_pretrained(tmp_path).model_type == "infinitevl"
