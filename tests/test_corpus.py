"""Corpus formats into one sample type, and bad input named by file, line and field."""

import io
import json
import tarfile

import pytest
from media_files import write_image, write_video

from ivl.data import BadSample, CorpusSpec, read_corpus

EXPECTED_USER = [{"type": "image"}, {"type": "text", "text": "What color is it?"}]


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def llava(image="red.png", question="<image>\nWhat color is it?", answer="Red."):
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_llava_jsonl_and_json(tmp_path):
    write_image(tmp_path / "red.png")
    for file in (write_jsonl(tmp_path / "c.jsonl", [llava()]), tmp_path / "c.json"):
        if file.suffix == ".json":
            file.write_text(json.dumps([llava()]))
        [sample] = read_corpus(CorpusSpec(str(file)))
        assert sample.messages[0] == {"role": "user", "content": EXPECTED_USER}
        assert sample.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}
        assert sample.media[0].kind == "image" and sample.media[0].path == str(tmp_path / "red.png")
    assert read_corpus(CorpusSpec(str(tmp_path / "c.jsonl")))[0].source == f"{tmp_path / 'c.jsonl'}:1"


def test_sharegpt_messages_and_qwen_message_lists(tmp_path):
    write_image(tmp_path / "red.png")
    write_video(tmp_path / "clip.mp4", [(255, 0, 0), (0, 0, 255)])
    sharegpt = {
        "messages": [{"role": "user", "content": "<image>What color is it?"}, {"role": "assistant", "content": "Red."}],
        "images": ["red.png"],
    }
    qwen = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": "clip.mp4", "fps": 4.0},
                    {"type": "text", "text": "Which color comes first?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ]
    }
    a, b = read_corpus(CorpusSpec(str(write_jsonl(tmp_path / "c.jsonl", [sharegpt, qwen]))))
    assert a.messages[0]["content"] == EXPECTED_USER
    assert b.messages[0]["content"][0] == {"type": "video"}
    assert b.media[0].kind == "video" and b.media[0].options == {"fps": 4.0}


def test_webdataset_shard(tmp_path):
    image = write_image(tmp_path / "x.png").read_bytes()
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for key in ("a", "b"):
            for name, data in (
                (f"{key}.png", image),
                (f"{key}.json", json.dumps({"conversations": llava()["conversations"]}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = read_corpus(CorpusSpec(str(tmp_path)))  # a folder of shards
    assert [s.source for s in samples] == [f"{tmp_path / 'shard-000.tar'}:a", f"{tmp_path / 'shard-000.tar'}:b"]
    assert samples[0].messages[0]["content"] == EXPECTED_USER
    # the image stays in the shard until the sample is encoded: an offset, not the bytes
    media = samples[0].media[0]
    assert media.data is None and media.member.size == len(image) and media.source().read() == image


def test_compressed_shards_are_read_into_memory(tmp_path):
    image = write_image(tmp_path / "x.png").read_bytes()
    with tarfile.open(tmp_path / "shard-000.tar", "w:gz") as tar:  # gzipped, under a .tar name
        for name, data in (
            ("a.png", image),
            ("a.json", json.dumps({"conversations": llava()["conversations"]}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = read_corpus(CorpusSpec(str(tmp_path / "shard-000.tar")))
    assert sample.media[0].data == image


def test_malformed_json_line_names_file_and_line(tmp_path):
    write_image(tmp_path / "red.png")
    file = write_jsonl(tmp_path / "c.jsonl", [llava(), '{"image": "red.png", "conversations": [', llava()])
    with pytest.raises(BadSample, match=r"c\.jsonl:2: malformed JSON line"):
        read_corpus(CorpusSpec(str(file)))
    bad = []
    assert len(read_corpus(CorpusSpec(str(file)), skip_bad_samples=True, bad=bad)) == 2
    assert len(bad) == 1 and "c.jsonl:2" in bad[0]


def test_tag_and_media_counts_must_agree(tmp_path):
    two_tags = llava(question="<image> and <image>: what colors?")
    file = write_jsonl(tmp_path / "c.jsonl", [two_tags])
    with pytest.raises(
        BadSample,
        match=r"c\.jsonl:1: conversations\[0\] has <image> tag number 2 but field "
        r"'image' lists 1",
    ):
        read_corpus(CorpusSpec(str(file)))
    no_tag = llava(question="What color is it?")
    with pytest.raises(
        BadSample,
        match=r"c\.jsonl:1: 0 <image> tag\(s\) in 'conversations' but field 'image' "
        r"lists 1",
    ):
        read_corpus(CorpusSpec(str(write_jsonl(tmp_path / "c.jsonl", [no_tag]))))


def test_record_without_answer_or_with_unknown_role(tmp_path):
    file = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(BadSample, match="no assistant turn"):
        read_corpus(CorpusSpec(str(file)))
    file = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(BadSample, match=r"c\.jsonl:1: conversations\[0\] has unknown role 'robot'"):
        read_corpus(CorpusSpec(str(file)))
