"""Building the teacher and the student a stage trains, from what a config names."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.errors import UsageError
from ivl.model import InfiniteVL, InfiniteVLConfig, checkpoint, convert_qwen2_5_vl
from ivl.model.convert import student_config as converted_config
from ivl.teachers.qwen2_5_vl import TINY_TEACHER


def check_teacher(teacher: str | None) -> None:
    """Raise a UsageError unless ``teacher`` is None, "tiny" or a Qwen2.5-VL checkpoint folder."""
    if teacher not in (None, "tiny") and not (Path(teacher) / "config.json").exists():
        raise UsageError(
            f"teacher {teacher!r}: not 'tiny' and no config.json there (a local Qwen2.5-VL "
            "checkpoint folder is expected; nothing is downloaded)"
        )


def check_student(student: str | None) -> None:
    """Raise a UsageError unless ``student`` is None or a folder written by ``save_pretrained``."""
    if student is not None and not (Path(student) / "config.json").exists():
        raise UsageError(
            f"student {student!r}: no config.json there (an InfiniteVL checkpoint folder, e.g. the "
            "save_dir of the previous stage, is expected)"
        )


def load_teacher(teacher: str, dtype: str | None = None, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """ "tiny" (a random tiny Qwen2.5-VL, seeded) or a local Qwen2.5-VL checkpoint folder; frozen, in eval mode."""
    if teacher == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                Qwen2_5_VLConfig(**TINY_TEACHER), attn_implementation="sdpa"
            )
    else:
        check_teacher(teacher)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            teacher, dtype=getattr(torch, dtype or "bfloat16"), attn_implementation="sdpa"
        )
    model.requires_grad_(False)
    return model.eval()


def load_student(
    student: str | None,
    teacher,
    hybrid_ratio: float,
    window: int | None,
    linear_init: str = "mimic",
    seed: int = 0,
    linear_mixer: str = "gated_deltanet",
) -> InfiniteVL:
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
        model, _ = convert_qwen2_5_vl(
            teacher,
            hybrid_ratio=hybrid_ratio,
            window=window,
            linear_init=linear_init,
            dtype=torch.float32,
            linear_mixer=linear_mixer,
        )
    return model.train()


def student_config(
    student: str | None, teacher, hybrid_ratio: float, window: int | None, linear_mixer: str = "gated_deltanet"
) -> InfiniteVLConfig:
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
        check_teacher(teacher)
        teacher_config = Qwen2_5_VLConfig.from_pretrained(teacher)
    return converted_config(teacher_config, hybrid_ratio, window, linear_mixer=linear_mixer)


def student_state(
    student: str | None,
    teacher,
    hybrid_ratio: float,
    window: int | None,
    linear_init: str = "mimic",
    seed: int = 0,
    linear_mixer: str = "gated_deltanet",
) -> dict[str, torch.Tensor]:
    """The weights of that student on the CPU: read from its folder, or converted from the teacher (float32)."""
    if student is not None:
        return checkpoint.read_state(student)
    model = load_student(None, teacher, hybrid_ratio, window, linear_init, seed, linear_mixer)
    return {name: tensor for name, tensor in model.state_dict().items() if name not in checkpoint.tied_names(model)}
