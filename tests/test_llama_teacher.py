"""SmolLM2-135M-Instruct (a real pretrained Llama, offline GGUF) as a Qwen2.5-VL-shaped teacher: same logits on
text as transformers' LlamaForCausalLM, the vision tokens added, a folder every stage and the converter take."""

import sys

import pytest
import torch

from ivl.errors import UsageError
from ivl.teachers import llama as llama_teacher
from ivl.teachers.llama import VISION_TOKENS, gguf_architecture, llama_as_qwen2_5_vl, load_llama, smollm2_gguf


@pytest.fixture(scope="module")
def smollm2():
    llama, tokenizer = load_llama(smollm2_gguf())
    original = [tokenizer(t).input_ids for t in ("Hello world!", "def f(x):\n    return x ** 2")]
    teacher, tokenizer = llama_as_qwen2_5_vl(llama, tokenizer)
    return llama, teacher, tokenizer, original


def test_teacher_logits_on_text_equal_the_llama_models(smollm2):
    llama, teacher, tokenizer, _ = smollm2
    ids = tokenizer("The capital of France is Paris. Python's list.sort() is stable.", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = llama(ids).logits
        got = teacher(input_ids=ids).logits
    vocab = reference.shape[-1]
    assert got.shape[-1] == vocab + len(VISION_TOKENS)
    error = ((got[..., :vocab] - reference).norm() / reference.norm()).item()
    assert error < 1e-4, error


def test_vision_tokens_are_appended_and_text_tokenizes_as_before(smollm2):
    llama, teacher, tokenizer, original = smollm2
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert ids == list(range(llama.config.vocab_size, llama.config.vocab_size + 4))
    assert [teacher.config.vision_start_token_id, teacher.config.image_token_id, teacher.config.video_token_id] == [
        ids[0],
        ids[2],
        ids[3],
    ]
    assert [tokenizer(t).input_ids for t in ("Hello world!", "def f(x):\n    return x ** 2")] == original
    assert tokenizer("a <|image_pad|> b").input_ids.count(ids[2]) == 1  # one token, not split into pieces


def test_the_tokenizer_pads_with_the_configs_pad_token_even_where_the_gguf_names_none():
    llama, tokenizer = load_llama(smollm2_gguf())
    tokenizer.pad_token = None  # what transformers 5.17 reads from this GGUF
    teacher, tokenizer = llama_as_qwen2_5_vl(llama, tokenizer)
    assert tokenizer.pad_token_id == teacher.config.text_config.pad_token_id == llama.config.eos_token_id
    batch = tokenizer(["a", "a b c d"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0].sum() < batch.attention_mask[1].sum()


def test_written_folder_converts_to_a_student(smollm2, tmp_path, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ivl.data.processing import Processor
    from ivl.model import convert_qwen2_5_vl

    llama, teacher, tokenizer, _ = smollm2
    monkeypatch.setattr(llama_teacher, "load_llama", lambda path: (llama, tokenizer))  # already loaded above
    monkeypatch.setattr(llama_teacher, "llama_as_qwen2_5_vl", lambda model, tok, seed: (teacher, tokenizer))
    folder = llama_teacher.write_teacher(tmp_path / "smollm2")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = Processor.from_pretrained(folder)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    ids = processor(text)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, teacher(input_ids=ids).logits)
    student, _ = convert_qwen2_5_vl(reloaded, hybrid_ratio=0.25, window=64)
    assert student.config.text.vocab_size == teacher.config.text_config.vocab_size
    assert student.config.text.mrope_section == [8, 12, 12]
    assert set(student.config.eos_token_ids) == {
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def test_clear_errors_for_a_missing_gguf_package_and_a_non_llama_file(tmp_path, monkeypatch):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_architecture(path) == "mamba"
    with pytest.raises(UsageError, match="'mamba' model; only Llama-architecture"):
        load_llama(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_llama(tmp_path / "missing.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(UsageError, match="pip install gguf"):
        load_llama(path)
