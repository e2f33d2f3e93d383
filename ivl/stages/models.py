"""Building the teacher and the student a stage trains, from what a config names."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.model import InfiniteVL, InfiniteVLConfig, checkpoint, convert_qwen2_5_vl
from ivl.model.convert import student_config as converted_config

# A tiny random Qwen2.5-VL with the real Qwen2.5 vocabulary and special tokens: the embedded default's teacher
# (and the tests'), so that the demo runs on a CPU in minutes with the real tokenizer.
TINY_TEACHER = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    ),
    vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[1], tokens_per_second=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=True,
)


def load_teacher(teacher: str, dtype: str | None = None, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """"tiny" (a random tiny Qwen2.5-VL, seeded) or a local Qwen2.5-VL checkpoint folder; frozen, in eval mode."""
    if teacher == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**TINY_TEACHER),
                                                                     attn_implementation="sdpa")
    else:
        if not (Path(teacher) / "config.json").exists():
            raise FileNotFoundError(f"teacher {teacher!r}: not 'tiny' and no config.json there (a local "
                                    "Qwen2.5-VL checkpoint folder is expected; nothing is downloaded)")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher, dtype=getattr(torch, dtype or "bfloat16"),
                                                                   attn_implementation="sdpa")
    model.requires_grad_(False)
    return model.eval()


def load_student(student: str | None, teacher, hybrid_ratio: float, window: int | None,
                 gdn_init: str = "mimic", seed: int = 0) -> InfiniteVL:
    """An InfiniteVL checkpoint folder, or (student None) a fresh conversion of the teacher (a name for
    ``load_teacher`` or an already loaded model). The student trains in float32 (mixed precision comes from the
    Trainer's ``precision``)."""
    if student is not None:
        return InfiniteVL.from_pretrained(student, dtype=torch.float32).train()
    if teacher is None:
        raise ValueError("name a student checkpoint folder, or a teacher to convert")
    if isinstance(teacher, str):
        teacher = load_teacher(teacher, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, _ = convert_qwen2_5_vl(teacher, hybrid_ratio=hybrid_ratio, window=window, gdn_init=gdn_init,
                                      dtype=torch.float32)
    return model.train()


def student_config(student: str | None, teacher, hybrid_ratio: float, window: int | None) -> InfiniteVLConfig:
    """The config of the student ``load_student`` would build, read without building it (for the meta device)."""
    if student is not None:
        return InfiniteVLConfig.from_dict(checkpoint.read_config(student)[0])
    if teacher is None:
        raise ValueError("name a student checkpoint folder, or a teacher to convert")
    if not isinstance(teacher, str):
        teacher_config = teacher.config
    elif teacher == "tiny":
        teacher_config = Qwen2_5_VLConfig(**TINY_TEACHER)
    else:
        if not (Path(teacher) / "config.json").exists():
            raise FileNotFoundError(f"teacher {teacher!r}: not 'tiny' and no config.json there (a local "
                                    "Qwen2.5-VL checkpoint folder is expected; nothing is downloaded)")
        teacher_config = Qwen2_5_VLConfig.from_pretrained(teacher)
    return converted_config(teacher_config, hybrid_ratio, window)


def student_state(student: str | None, teacher, hybrid_ratio: float, window: int | None, gdn_init: str = "mimic",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of that student on the CPU: read from its folder, or converted from the teacher (float32)."""
    if student is not None:
        return checkpoint.read_state(student)
    model = load_student(None, teacher, hybrid_ratio, window, gdn_init, seed)
    return {name: tensor for name, tensor in model.state_dict().items()
            if name not in checkpoint.tied_names(model)}
