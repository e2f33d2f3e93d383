"""Every Python snippet of README.md runs as written, on the tiny shapes and the CPU, in a fresh working directory
holding the files the snippets name (a tiny Qwen2.5-VL teacher folder, an image, a corpus and a shard)."""

import contextlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from media_files import write_image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.serve.launch import running_server
from ivl.teachers.qwen2_5_vl import TINY_TEACHER

README = Path(__file__).parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# What a GPU machine with the real teacher has, and this test has not.
SERVER_URL = "http://127.0.0.1:8000"
REPLACE = [
    ('"/models/Qwen2.5-VL-3B-Instruct"', "TEACHER"),
    ('"cuda"', '"cpu"'),
    ("num_workers=8", "num_workers=0"),
    ("max_new_tokens=64", "max_new_tokens=4"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**TINY_TEACHER)).save_pretrained(teacher)
    write_image(tmp_path / "cat.jpg", (200, 120, 40))
    conversation = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]
    write_image(tmp_path / "data" / "images" / "red.png")
    (tmp_path / "data" / "llava_mix.jsonl").write_text(
        "\n".join(json.dumps({"image": "red.png", "conversations": conversation}) for _ in range(3)) + "\n"
    )
    (tmp_path / "data" / "shards").mkdir()
    image = (tmp_path / "data" / "images" / "red.png").read_bytes()
    with tarfile.open(tmp_path / "data" / "shards" / "shard-000.tar", "w") as tar:
        for name, data in (("a.png", image), ("a.json", json.dumps({"conversations": conversation}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(index, workdir):
    code = SNIPPETS[index]
    for old, new in REPLACE:
        code = code.replace(old, new)
    with contextlib.ExitStack() as stack:
        if SERVER_URL in code:  # a client snippet: against `python lightning_app.py` (the tiny model here)
            url, _ = stack.enter_context(
                running_server("--api-key", "KEY", log_path=workdir / "server.log", env={"OMP_NUM_THREADS": "1"})
            )
            code = code.replace(SERVER_URL, url)
        exec(compile(code, f"README.md, Python snippet {index + 1}", "exec"), {"TEACHER": str(workdir / "teacher")})


def test_a_saved_student_folder_carries_its_processor(workdir):
    """save_pretrained writes the tokenizer, chat template and image settings next to the weights."""
    from ivl.data import Processor
    from ivl.model import convert_qwen2_5_vl

    model, _ = convert_qwen2_5_vl(str(workdir / "teacher"))
    model.save_pretrained("student")
    saved, bundled = Processor.from_pretrained("student"), Processor.from_pretrained()
    text = bundled.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    )
    assert (
        saved.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
        == text
    )
    assert saved.tokenizer(text)["input_ids"] == bundled.tokenizer(text)["input_ids"]
    assert saved.image_size == bundled.image_size
