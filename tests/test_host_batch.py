"""What the stages compute on the host before a batch reaches the GPU (``ivl.stages.host_batch``) changes nothing
that the model computes: same losses, same gradients, from positions, labelled positions and bounds that the step
no longer reads back from the device."""

from unittest import mock

import pytest
import torch
from teacher import image_video_prompt, tiny_teacher

from ivl.kernels import packed_bounds
from ivl.model import convert_qwen2_5_vl
from ivl.stages import host_batch
from ivl.stages.base import MODEL_INPUTS


@pytest.fixture(scope="module")
def student():
    return convert_qwen2_5_vl(tiny_teacher(), window=8)[0]


def packed_batch():
    torch.manual_seed(0)
    a, b = image_video_prompt(text_len=4), image_video_prompt(text_len=9)
    batch = {
        k: torch.cat([a[k], b[k]], dim=1 if k == "input_ids" else 0)
        for k in (
            "input_ids",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
            "second_per_grid_ts",
        )
    }
    n = a["input_ids"].shape[1]
    batch["cu_seqlens"] = torch.tensor([0, n, batch["input_ids"].shape[1]], dtype=torch.int32)
    labels = batch["input_ids"].clone()
    # answers: the rest of each sample, and the first token of the second (which nothing in the first predicts)
    labels[:, :6] = labels[:, n + 1 : n + 8] = -100
    batch["labels"] = labels
    return batch


def padded_batch(pad: int):
    torch.manual_seed(0)
    batch = image_video_prompt(batch=2)
    del batch["mm_token_type_ids"]
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :5] = -100
    if pad:  # row 1 ends in padding
        batch["attention_mask"][1, -pad:] = 0
        batch["labels"][1, -pad:] = -100
    return batch


def losses_and_grads(student, batch):
    student.zero_grad()
    out = student.head_losses(
        labels=batch["labels"],
        label_positions=batch.get("label_positions"),
        **{k: batch[k] for k in MODEL_INPUTS if k in batch},
    )
    out.ce.backward()
    return out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "make", [packed_batch, lambda: padded_batch(0), lambda: padded_batch(3)], ids=["packed", "all-ones-mask", "padded"]
)
def test_host_prepared_batch_trains_exactly_like_the_raw_batch(student, make):
    raw = make()
    prepared = host_batch.arrived(host_batch.prepare(make(), student.position_ids))
    assert "position_ids" in prepared and "label_positions" in prepared
    mask = raw.get("attention_mask")
    assert prepared["tokens"] == (int(mask.sum()) if mask is not None else raw["input_ids"].numel())
    assert ("attention_mask" in prepared) == (mask is not None and not bool(mask.all()))
    expected, expected_grads = losses_and_grads(student, raw)
    got, grads = losses_and_grads(student, prepared)
    torch.testing.assert_close(got.ce, expected.ce, rtol=0, atol=0)
    torch.testing.assert_close(got.correct, expected.correct, equal_nan=True)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=0, msg=name)


def test_packed_bounds_arrive_known_on_the_host():
    """After the copy, the layers' ``host_bounds`` is answered from the host's count: the tensor is never read."""
    expected = tuple(packed_batch()["cu_seqlens"].tolist())
    prepared = host_batch.prepare(packed_batch())
    cu = prepared["cu_seqlens"].clone()  # what the copy to the device gives: another tensor, same values
    arrived = host_batch.arrived({**prepared, "cu_seqlens": cu})
    assert host_batch.HOST_BOUNDS not in arrived
    with mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("read the tensor")):
        assert packed_bounds.host_bounds(cu) == expected


def test_chunk_indices_name_every_chunk_of_every_packed_sequence():
    """Against the chunks read off a per-token labelling: (sequence, offset // chunk) of every token, deduplicated."""
    lengths = [1, 64, 65, 200, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    tokens = [(n, t // 64) for n, length in enumerate(lengths) for t in range(length)]
    expected = list(dict.fromkeys(tokens))
    got = packed_bounds.chunk_indices(cu, 64)
    assert got.dtype == cu.dtype and got.tolist() == [list(r) for r in expected]
    assert packed_bounds.chunk_indices(cu, 64) is got  # one build per batch, shared by every layer
