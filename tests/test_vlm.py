"""InfiniteVL against the transformers Qwen2.5-VL teacher it is converted from."""

import pytest
import torch
import torch.nn.functional as F
from references import assert_as_accurate, doubled, float64
from teacher import image_video_prompt, tiny_teacher

from ivl.model import InfiniteVL, convert_qwen2_5_vl

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def randomise_gdn(model):
    """Random (not mimic) GDN gates and convolutions and larger GDN projections, so that every part of the
    layer visibly changes the logits in a test."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("a_proj", "b_proj", "conv1d", "A_log", "dt_bias")):
                p.normal_(0, 0.5)
            elif ".mixer." in name and any(key in name for key in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")):
                p.normal_(0, 0.3)
    return model


def student_inputs(inputs):
    return {k: inputs[k] for k in MODEL_INPUTS}


def test_all_attention_conversion_reproduces_the_teacher(teacher):
    inputs = image_video_prompt(batch=2)
    with torch.no_grad():
        expected = teacher(**inputs).logits
    student, report = convert_qwen2_5_vl(teacher, layer_types=["attention"] * 4, window=4096)
    assert report.new == [] and report.unused == []
    with torch.no_grad():
        got = student(**student_inputs(inputs)).logits
    assert ((got - expected).norm() / expected.norm()) < 1e-4


def test_quarter_conversion_keeps_teacher_tensors_and_reports_the_rest_new(teacher):
    student, report = convert_qwen2_5_vl(teacher, hybrid_ratio=0.25)
    assert student.config.text.layer_types == ["attention", "gated_deltanet", "gated_deltanet", "gated_deltanet"]
    t = dict(teacher.named_parameters())
    s = dict(student.named_parameters())
    for name, p in t.items():
        if ".visual." in name:
            assert torch.equal(s[name.removeprefix("model.")], p), name
    torch.testing.assert_close(
        s["lm.embed_tokens.weight"], t["model.language_model.embed_tokens.weight"], rtol=0, atol=0
    )
    for i in range(4):
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                s[f"lm.layers.{i}.mlp.{part}.weight"], t[f"model.language_model.layers.{i}.mlp.{part}.weight"]
            )
    assert torch.equal(s["lm.layers.0.mixer.q_proj.weight"], t["model.language_model.layers.0.self_attn.q_proj.weight"])
    new = set(report.new)
    assert new == {n for n in s if n.startswith(("lm.layers.1.mixer.", "lm.layers.2.mixer.", "lm.layers.3.mixer."))}
    assert report.inherited_parameters + report.new_parameters == sum(p.numel() for p in student.parameters())
    # the replaced attention layers are what is left of the teacher
    assert all(".self_attn." in n and not n.startswith("text.layers.0.") for n in report.unused)
    # mimic initialisation: identity convolutions, beta = 0.5, decay close to 1
    gdn = student.lm.layers[1].mixer
    assert torch.equal(gdn.q_conv1d.weight[:, 0, -1], torch.ones(gdn.q_conv1d.weight.shape[0]))
    assert gdn.b_proj.weight.abs().sum() == 0


def test_attention_init_copies_q_and_grouped_k(teacher):
    student, report = convert_qwen2_5_vl(teacher, hybrid_ratio=0.25, linear_init="attention")
    attn = teacher.model.language_model.layers[2].self_attn
    gdn = student.lm.layers[2].mixer
    assert torch.equal(gdn.q_proj.weight, attn.q_proj.weight)
    # query head h of the teacher reads key head h // (16 / 2): so does GDN head h after the copy
    k = attn.k_proj.weight.view(2, 16, 64)
    for h in range(4):
        assert torch.equal(gdn.k_proj.weight.view(4, 16, 64)[h], k[h // 2])
    assert "lm.layers.2.mixer.k_proj.weight" in report.inherited
    with pytest.warns(FutureWarning, match="'gdn_init' is renamed 'linear_init'"):  # the old name still works
        old, _ = convert_qwen2_5_vl(teacher, hybrid_ratio=0.25, gdn_init="attention")
    assert torch.equal(old.lm.layers[2].mixer.k_proj.weight, gdn.k_proj.weight)


def test_conversion_from_a_checkpoint_folder(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "teacher", max_shard_size="200KB")
    assert (tmp_path / "teacher" / "model.safetensors.index.json").exists()
    from_folder, report = convert_qwen2_5_vl(tmp_path / "teacher", hybrid_ratio=0.5)
    from_model, _ = convert_qwen2_5_vl(teacher, hybrid_ratio=0.5)
    inherited = dict(from_model.named_parameters())
    for name in report.inherited:
        assert torch.equal(dict(from_folder.named_parameters())[name], inherited[name]), name


def test_save_then_load_gives_identical_logits(teacher, tmp_path):
    student = randomise_gdn(convert_qwen2_5_vl(teacher)[0])
    inputs = student_inputs(image_video_prompt())
    student.save_pretrained(tmp_path / "s", max_shard_size="300KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    loaded = InfiniteVL.from_pretrained(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, student(**inputs).logits, rtol=0, atol=0)
    student.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert next(InfiniteVL.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16


def test_loss_is_next_token_cross_entropy_over_labelled_tokens(teacher):
    student = convert_qwen2_5_vl(teacher)[0]
    inputs = student_inputs(image_video_prompt())
    labels = inputs["input_ids"].clone()
    labels[:, :20] = -100
    out = student(**inputs, labels=labels)
    expected = F.cross_entropy(out.logits[0, 19:-1], inputs["input_ids"][0, 20:])
    torch.testing.assert_close(out.loss, expected)


def test_packed_batch_equals_separate_samples(teacher):
    student = randomise_gdn(convert_qwen2_5_vl(teacher, window=8)[0])
    a, b = image_video_prompt(text_len=4), image_video_prompt(text_len=9)
    packed = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]], dim=1),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
        "pixel_values_videos": torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]),
        "video_grid_thw": torch.cat([a["video_grid_thw"], b["video_grid_thw"]]),
        "second_per_grid_ts": torch.cat([a["second_per_grid_ts"], b["second_per_grid_ts"]]),
    }
    n = a["input_ids"].shape[1]
    cu = torch.tensor([0, n, packed["input_ids"].shape[1]], dtype=torch.int32)
    exact_student = float64(student)
    with torch.no_grad():
        together = student(**packed, cu_seqlens=cu).logits
        for part, inputs in ((together[:, :n], a), (together[:, n:], b)):
            exact = exact_student(**doubled(student_inputs(inputs))).logits
            assert_as_accurate(part, student(**student_inputs(inputs)).logits, exact)


def greedy_by_full_forwards(model, inputs, steps):
    """Tokens and logits of greedy decoding that recomputes the whole sequence at every step (no cache)."""
    ids = inputs["input_ids"]
    tokens, logits = [], []
    for _ in range(steps):
        with torch.no_grad():
            last = model(**{**inputs, "input_ids": ids, "attention_mask": None}).logits[:, -1]
        logits.append(last)
        tokens.append(last.argmax(-1))
        ids = torch.cat([ids, tokens[-1][:, None]], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


@pytest.mark.parametrize("prefill_chunk", [None, 7])
def test_cached_generate_equals_greedy_full_forwards(teacher, prefill_chunk):
    student = randomise_gdn(convert_qwen2_5_vl(teacher, window=12)[0])  # the window is crossed while decoding
    inputs = student_inputs(image_video_prompt())
    expected_tokens, expected_logits = greedy_by_full_forwards(student, inputs, steps=20)
    tokens, logits = student.generate(
        **inputs, max_new_tokens=20, stop_token_ids=[], prefill_chunk=prefill_chunk, return_scores=True
    )
    assert torch.equal(tokens, expected_tokens)
    exact_tokens, exact = greedy_by_full_forwards(float64(student), doubled(inputs), steps=20)
    assert torch.equal(exact_tokens, tokens)
    assert_as_accurate(logits, expected_logits, exact)


def left_padded(a: dict, b: dict) -> tuple[dict, int]:
    """Two one-row inputs as a batch, the shorter ``a`` left-padded to ``b``'s length; and the padding."""
    pad = b["input_ids"].shape[1] - a["input_ids"].shape[1]
    zeros = torch.zeros(1, pad, dtype=torch.long)
    return {
        "input_ids": torch.cat([torch.cat([zeros, a["input_ids"]], 1), b["input_ids"]]),
        "attention_mask": torch.cat([torch.cat([zeros, a["attention_mask"]], 1), b["attention_mask"]]),
        **{k: torch.cat([a[k], b[k]]) for k in MODEL_INPUTS[2:]},
    }, pad


def test_left_padded_batch_generates_what_each_prompt_generates_alone(teacher):
    student = randomise_gdn(convert_qwen2_5_vl(teacher, window=12)[0])
    a, b = student_inputs(image_video_prompt(text_len=3)), student_inputs(image_video_prompt(text_len=10))
    batch, _ = left_padded(a, b)
    tokens, logits = student.generate(**batch, max_new_tokens=10, stop_token_ids=[], return_scores=True)
    exact_student = float64(student)
    for row, alone in enumerate((a, b)):
        alone_tokens, alone_logits = student.generate(**alone, max_new_tokens=10, stop_token_ids=[], return_scores=True)
        assert torch.equal(tokens[row], alone_tokens[0])
        _, exact = exact_student.generate(**doubled(alone), max_new_tokens=10, stop_token_ids=[], return_scores=True)
        assert_as_accurate(logits[row], alone_logits[0], exact[0])


def test_a_float64_model_is_exact_so_a_padded_row_equals_it_alone(teacher):
    """The float64 copy that the tests hold float32 paths to must compute in float64 all through (norms, gates and
    recurrences included): then left padding, which moves a row's tokens across the recurrence's chunks, changes
    nothing beyond float64 rounding. A float32 step inside it left 1.5e-6 here."""
    from references import relative_error

    student = float64(randomise_gdn(convert_qwen2_5_vl(teacher, window=12)[0]))
    a, b = student_inputs(image_video_prompt(text_len=3)), student_inputs(image_video_prompt(text_len=10))
    batch, pad = left_padded(a, b)
    with torch.no_grad():
        padded = student(**doubled(batch)).logits
        alone = student(**doubled(a)).logits
    assert padded.dtype == torch.float64
    assert relative_error(padded[0, pad:], alone[0]) < 1e-12


def test_stop_tokens_end_rows_and_pad_them(teacher):
    student = randomise_gdn(convert_qwen2_5_vl(teacher)[0])
    inputs = student_inputs(image_video_prompt(batch=2))
    free = student.generate(**inputs, max_new_tokens=8, stop_token_ids=[])
    stop = int(free[0, 2])
    stopped = student.generate(**inputs, max_new_tokens=8, stop_token_ids=[stop])
    first = int((free[0] == stop).nonzero()[0])
    assert torch.equal(stopped[0, : first + 1], free[0, : first + 1])
    assert (stopped[0, first + 1 :] == student.config.pad_token_id).all()


def test_sampling_respects_top_p_and_seed(teacher):
    student = randomise_gdn(convert_qwen2_5_vl(teacher)[0])
    inputs = student_inputs(image_video_prompt())
    greedy = student.generate(**inputs, max_new_tokens=6, stop_token_ids=[])
    # a nucleus smaller than the top token's mass leaves only the top token: sampling becomes greedy
    nucleus = student.generate(**inputs, max_new_tokens=6, stop_token_ids=[], do_sample=True, top_p=1e-6)
    assert torch.equal(nucleus, greedy)
    draws = [
        student.generate(
            **inputs,
            max_new_tokens=6,
            stop_token_ids=[],
            do_sample=True,
            temperature=5.0,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (1, 1, 2)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_placeholders_without_pixels_are_an_error(teacher):
    student = convert_qwen2_5_vl(teacher)[0]
    inputs = student_inputs(image_video_prompt())
    inputs["pixel_values"] = None
    with pytest.raises(ValueError, match="4 image placeholder tokens but no image pixels"):
        student(**inputs)


def test_placeholders_without_pixels_or_grid_are_an_error_naming_the_row(teacher):
    student = convert_qwen2_5_vl(teacher)[0]
    inputs = student_inputs(image_video_prompt())
    inputs["pixel_values"] = inputs["image_grid_thw"] = None
    with pytest.raises(ValueError, match="row 0: more image placeholder tokens than images in image_grid_thw"):
        student(**inputs)


def test_convert_command_writes_a_loadable_checkpoint(teacher, tmp_path):
    from ivl.convert import main

    teacher.save_pretrained(tmp_path / "teacher")
    main(
        [
            "--teacher",
            str(tmp_path / "teacher"),
            "--out",
            str(tmp_path / "student"),
            "--hybrid-ratio",
            "0.5",
            "--window",
            "64",
        ]
    )
    student = InfiniteVL.from_pretrained(tmp_path / "student")
    assert student.config.text.layer_types == ["attention", "gated_deltanet"] * 2
    assert student.config.text.window == 64
    t = dict(teacher.named_parameters())
    assert torch.equal(
        student.lm.layers[2].mixer.k_proj.weight, t["model.language_model.layers.2.self_attn.k_proj.weight"]
    )
    report = __import__("json").loads((tmp_path / "student" / "conversion_report.json").read_text())
    assert report["new_parameters"] == sum(
        p.numel() for n, p in student.named_parameters() if n.startswith(("lm.layers.1.mixer.", "lm.layers.3.mixer."))
    )


def test_a_left_padded_batch_decodes_each_row_as_full_forwards_of_it_alone(teacher):
    """Each row runs in its own slot of the engine's pool, its tokens counted from its first real one: crossing the
    window while decoding (window 12), a padded row gives what full forwards of its prompt alone give."""
    student = randomise_gdn(convert_qwen2_5_vl(teacher, window=12)[0])
    a, b = student_inputs(image_video_prompt(text_len=3)), student_inputs(image_video_prompt(text_len=10))
    batch, _ = left_padded(a, b)
    tokens = student.generate(**batch, max_new_tokens=16, stop_token_ids=[], decoder="static")
    for row, alone in enumerate((a, b)):
        expected, _ = greedy_by_full_forwards(student, alone, steps=16)
        assert torch.equal(tokens[row], expected[0])
