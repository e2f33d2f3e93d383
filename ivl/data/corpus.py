"""Corpus formats users bring, read into one sample type: Qwen-style messages with typed image/video parts.

- LLaVA / Qwen-finetune JSON or JSONL: ``conversations`` ([{"from": "human"|"gpt", "value": "... <image> ..."}])
  with ``image`` (a path or a list), ``images`` or ``video``; one ``<image>``/``<video>`` tag per medium.
- ShareGPT (LLaMA-Factory): ``messages`` ([{"role", "content": "... <image> ..."}]) with ``images``/``videos``.
- Qwen2.5-VL message lists: ``messages`` whose contents are lists of {"type": "image", "image": path, ...},
  {"type": "video", "video": path, "fps"/"nframes": ...} and {"type": "text", "text": ...}.
- WebDataset tar shards: members grouped by key, ``KEY.json`` (any of the above) plus ``KEY.<jpg|png|...>`` /
  ``KEY.mp4`` media; a record's media names refer to members of its own group ("jpg", or a full member name).

Every sample remembers where it came from (``file:line`` or ``shard:key``), so errors can say so.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ivl.errors import UsageError

IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
VIDEO_SUFFIXES = {"mp4", "avi", "mov", "mkv", "webm"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(ValueError):
    """A sample that cannot be used; the message names the file, line (or shard key) and field."""


@dataclass(frozen=True)
class ShardMember:
    """Where a tar member's bytes lie (file, offset, size): read when the sample is encoded, not at setup."""

    file: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Media:
    """An image or video: a path on disk, a member of a tar shard, or bytes; video sampling options ride along."""

    kind: str  # "image" | "video"
    path: str | None = None
    data: bytes | None = None
    options: dict = field(default_factory=dict)  # fps, nframes, min_pixels, max_pixels
    member: ShardMember | None = None

    @property
    def name(self) -> str:
        return self.path or "<bytes>"

    def source(self):
        """What a decoder opens: a file-like object over the bytes, or the path."""
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.member is not None:
            return io.BytesIO(self.member.read())
        return self.path


@dataclass
class Sample:
    messages: list[dict]
    """[{"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"} | {"type": "video"}]}]"""
    media: list[Media]
    """In order of appearance in the messages."""
    source: str
    """Where it came from: "file:line" or "shard.tar:key"."""
    task: str | None = None
    """The record's "task" field, else the corpus name: accuracy is reported per task."""


@dataclass
class CorpusSpec:
    """One corpus in a mixture."""

    path: str
    """A .json/.jsonl file, a .tar shard, or a folder of .tar shards (a glob like 'shards/*.tar' works too)."""
    media_root: str | None = None
    """Folder relative media paths are resolved against (default: the file's folder)."""
    weight: float = 1.0
    """Sampling weight in a mixture (relative)."""
    name: str | None = None


def corpus_files(spec: CorpusSpec) -> list[Path]:
    """The files a corpus path names (itself, the shards a glob matches, or a folder's .tar shards); [] if none."""
    path = Path(spec.path)
    if any(ch in spec.path for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(spec.path))
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return [path] if path.exists() else []


def check_corpus(spec: CorpusSpec, field: str, hint: str | None = None) -> None:
    """Raise a UsageError naming the config ``field`` (and ``hint``, how to get the files) if the corpus has no
    files."""
    if not corpus_files(spec):
        raise UsageError(f"{field}: corpus {spec.path!r} not found" + (f"; {hint}" if hint else ""))


def read_corpus(spec: CorpusSpec, skip_bad_samples: bool = False, bad: list | None = None) -> list[Sample]:
    """All samples of one corpus. Malformed records raise ``BadSample`` naming file, line and field, or, with
    ``skip_bad_samples``, are left out and their errors appended to ``bad``."""
    files = corpus_files(spec)
    if not files:
        raise FileNotFoundError(f"corpus {spec.path!r}: no such file")
    samples = []
    for file in files:
        root = Path(spec.media_root) if spec.media_root else file.parent
        records = _tar_records(file) if file.suffix == ".tar" else _json_records(file)
        for source, record, members in records:
            try:
                if isinstance(record, BadSample):
                    raise record
                sample = to_sample(record, source, root, members)
                sample.task = sample.task or spec.name
                samples.append(sample)
            except BadSample as err:
                if not skip_bad_samples:
                    raise
                if bad is not None:
                    bad.append(str(err))
    return samples


def _json_records(file: Path):
    """(source, record | BadSample, None) for a JSON list or JSON-lines file."""
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadSample(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from err
        # A JSON array has no line per record; name the record by its index.
        for i, record in enumerate(records):
            yield f"{file}[{i}]", record, None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{file}:{lineno}", json.loads(line), None
        except json.JSONDecodeError as err:
            yield f"{file}:{lineno}", BadSample(f"{file}:{lineno}: malformed JSON line ({err.msg}, column "
                                                f"{err.colno})"), None


def _tar_records(file: Path):
    """(source, record, {suffix or member name: bytes of a .json member, else a ShardMember}) per key of a
    WebDataset shard. The headers are read in one pass; media bytes stay in the file until a sample is encoded,
    so a multi-GB shard costs its index, not its size, in memory."""
    groups: dict[str, dict] = {}
    try:
        tar, lazy = tarfile.open(file, "r:"), True  # a plain tar: members can be read in place later
    except tarfile.ReadError:
        tar, lazy = tarfile.open(file), False  # compressed: offsets are not file offsets; read the bytes now
    with tar:
        for member in tar:  # streams the headers; only .json members are read
            if not member.isfile():
                continue
            base = Path(member.name).name
            key, _, suffix = base.partition(".")
            if suffix == "json" or not lazy or member.sparse is not None:
                data = tar.extractfile(member).read()
            else:
                data = ShardMember(str(file), member.offset_data, member.size)
            group = groups.setdefault(str(Path(member.name).parent / key), {})
            group[suffix] = group[base] = data  # reachable as "jpg" (WebDataset style) or "key.jpg"
    for key, members in groups.items():
        source = f"{file}:{key}"
        if "json" not in members:
            yield source, BadSample(f"{source}: no .json member"), members
            continue
        try:
            record = json.loads(members["json"])
        except json.JSONDecodeError as err:
            yield source, BadSample(f"{source}.json: malformed JSON ({err.msg})"), members
            continue
        if not any(k in record for k in ("image", "images", "video", "videos")):
            # a plain WebDataset sample: the media is the group's image or video member
            images = [s for s in members if s in IMAGE_SUFFIXES]
            videos = [s for s in members if s in VIDEO_SUFFIXES]
            if images:
                record["images"] = images[:1]
            elif videos:
                record["video"] = videos[0]
        yield source, record, members


def to_sample(record: dict, source: str, root: Path, members: dict | None = None) -> Sample:
    """One record in any of the formats -> Sample. Raises BadSample naming the source and field."""
    if not isinstance(record, dict):
        raise BadSample(f"{source}: a record must be a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        field_name, turns = "conversations", record["conversations"]
    elif "messages" in record:
        field_name, turns = "messages", record["messages"]
    else:
        raise BadSample(f"{source}: no 'conversations' or 'messages' field")
    if not isinstance(turns, list) or not turns:
        raise BadSample(f"{source}: field '{field_name}' must be a non-empty list")

    def resolve(kind: str, value, field: str) -> Media:
        options = {}
        if isinstance(value, dict):
            options = {k: v for k, v in value.items() if k in ("fps", "nframes", "min_pixels", "max_pixels")}
            value = value.get(kind) or value.get("path")
        if not isinstance(value, str) or not value:
            raise BadSample(f"{source}: field '{field}' must be a path, got {value!r}")
        if members is not None:
            name = value.removeprefix("./")
            data = members.get(name) or members.get(name.rpartition(".")[2] if "." in name else name)
            if data is None:
                raise BadSample(f"{source}: field '{field}' names {value!r}, which is not in the shard")
            if isinstance(data, ShardMember):
                return Media(kind, path=f"{source}.{name}", options=options, member=data)
            return Media(kind, path=f"{source}.{name}", data=data, options=options)
        path = Path(value) if Path(value).is_absolute() else root / value
        return Media(kind, path=str(path), options=options)

    listed = {"image": [], "video": []}
    for kind, keys in (("image", ("image", "images")), ("video", ("video", "videos"))):
        for key in keys:
            if key in record and record[key] not in (None, [], ""):
                values = record[key] if isinstance(record[key], list) else [record[key]]
                listed[kind] += [(v, f"{key}[{i}]" if isinstance(record[key], list) else key)
                                 for i, v in enumerate(values)]

    messages, media = [], []
    tag_count = {"image": 0, "video": 0}
    for t, turn in enumerate(turns):
        where = f"{field_name}[{t}]"
        if not isinstance(turn, dict):
            raise BadSample(f"{source}: {where} must be an object")
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise BadSample(f"{source}: {where} has unknown role {turn.get('from', turn.get('role'))!r}")
        content = turn.get("value", turn.get("content"))
        parts = []
        if isinstance(content, str):
            for kind, piece in _split_tags(content):
                if kind == "text":
                    if piece:
                        parts.append({"type": "text", "text": piece})
                    continue
                tag_count[kind] += 1
                if tag_count[kind] > len(listed[kind]):
                    raise BadSample(f"{source}: {where} has <{kind}> tag number {tag_count[kind]} but field "
                                    f"'{kind}' lists {len(listed[kind])} {kind}(s)")
                value, field = listed[kind][tag_count[kind] - 1]
                media.append(resolve(kind, value, field))
                parts.append({"type": kind})
        elif isinstance(content, list):  # Qwen message list: typed parts carry their own media
            for p, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind in ("image", "video"):
                    media.append(resolve(kind, part, f"{where}.content[{p}].{kind}"))
                    tag_count[kind] += 1
                    parts.append({"type": kind})
                else:
                    raise BadSample(f"{source}: {where}.content[{p}] has unknown type {kind!r}")
        else:
            raise BadSample(f"{source}: {where} has no text ('value' or 'content')")
        messages.append({"role": role, "content": parts})
    for kind in ("image", "video"):
        if listed[kind] and tag_count[kind] != len(listed[kind]):
            raise BadSample(f"{source}: {tag_count[kind]} <{kind}> tag(s) in '{field_name}' but field '{kind}' "
                            f"lists {len(listed[kind])} {kind}(s)")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample(f"{source}: no assistant turn in '{field_name}' (nothing to learn)")
    task = record.get("task") if isinstance(record.get("task"), str) else None
    return Sample(messages=messages, media=media, source=source, task=task)


def _split_tags(text: str):
    """('text', piece) and ('image' | 'video', '') in order, for <image> / <video> tags in a string."""
    out, rest = [], text
    while rest:
        positions = [(rest.find(tag), kind) for tag, kind in (("<image>", "image"), ("<video>", "video"))]
        positions = [(i, k) for i, k in positions if i >= 0]
        if not positions:
            out.append(("text", rest))
            break
        i, kind = min(positions)
        out.append(("text", rest[:i]))
        out.append((kind, ""))
        rest = rest[i + len(kind) + 2:]
        if rest.startswith("\n"):
            rest = rest[1:]
    return out
