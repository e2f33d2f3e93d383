"""Benchmarks in VLMEvalKit's TSV format: one row per question.

Columns: ``index``, ``question`` and ``answer`` are required; images come from ``image`` (base64, a Python list of
them, or, as VLMEvalKit writes to save space, the ``index`` of another row whose image is the same) or
``image_path`` (a path or a list, relative to the TSV's folder or ``media_root``); ``hint``, options ``A``, ``B``,
... (multiple choice when present), ``category``, ``l2-category``, ``split`` are optional; ``video`` names a file
under ``media_root`` (video benchmarks). Open-answer references may be a Python list literal of several answers
(VQA-style scoring uses all of them).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

REQUIRED = ("index", "question", "answer")
OPTION_LETTERS = tuple(string.ascii_uppercase)


class BadRow(ValueError):
    """A row that cannot be evaluated; the message names the file, the row and the column."""


@dataclass
class Item:
    index: str
    question: str
    answers: list[str]  # one reference, or several (VQA-style)
    images: list[Image.Image] = field(default_factory=list)
    video: Path | None = None
    hint: str = ""
    options: dict[str, str] = field(default_factory=dict)  # letter -> text, in letter order
    category: str = ""
    l2_category: str = ""
    split: str = ""

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


def _list_or_one(value: str) -> list[str]:
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [value]


def read_tsv(path: str | Path, media_root: str | Path | None = None, skip_bad: bool = False
             ) -> tuple[list[Item], list[str]]:
    """(items, skipped): every row as an ``Item``; with ``skip_bad`` rows that cannot be read are left out and
    their errors returned, otherwise the first one is raised as ``BadRow``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise BadRow(f"{path}: missing column(s) {missing}; a VLMEvalKit TSV needs {list(REQUIRED)} "
                     f"(has {columns})")
    images_by_index = {r["index"]: r["image"] for r in rows if len(r.get("image") or "") > 64}
    letters = [c for c in OPTION_LETTERS if c in columns]
    items, skipped = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            items.append(_item(row, line, path, letters, images_by_index, media_root))
        except BadRow as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
    return items, skipped


def _item(row, line, path, letters, images_by_index, media_root) -> Item:
    where = f"{path}, line {line} (index {row['index']})"
    question = row["question"]
    if not question.strip():
        raise BadRow(f"{where}, column question: empty")
    options = {c: row[c] for c in letters if (row.get(c) or "").strip() and row[c] != "nan"}
    answers = _list_or_one(row["answer"].strip())
    if options and answers[0] not in options:
        raise BadRow(f"{where}, column answer: {answers[0]!r} is not one of its options {list(options)}")
    images = []
    if (row.get("image") or "").strip():
        for k, value in enumerate(_list_or_one(row["image"].strip())):
            value = images_by_index.get(value, value) if len(value) <= 64 else value
            images.append(_decode_base64(value, f"{where}, column image" + (f"[{k}]" if k else "")))
    elif (row.get("image_path") or "").strip():
        for value in _list_or_one(row["image_path"].strip()):
            images.append(_open(_resolve(value, path, media_root), f"{where}, column image_path"))
    video = None
    if (row.get("video") or "").strip():
        if media_root is None:
            raise BadRow(f"{where}, column video: names {row['video']!r}; pass --media-root with the videos")
        video = Path(media_root) / row["video"]
        if not video.is_file():
            raise BadRow(f"{where}, column video: no file {video}")
    hint = row.get("hint") or ""
    return Item(index=row["index"], question=question, answers=answers, images=images, video=video,
                hint="" if hint == "nan" else hint, options=options, category=row.get("category") or "",
                l2_category=row.get("l2-category") or "", split=row.get("split") or "")


def _resolve(value: str, path: Path, media_root) -> Path:
    candidate = Path(value)
    if candidate.is_absolute():
        return candidate
    for base in ([Path(media_root)] if media_root else []) + [path.parent]:
        if (base / candidate).exists():
            return base / candidate
    return (Path(media_root) if media_root else path.parent) / candidate


def _decode_base64(value: str, where: str) -> Image.Image:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRow(f"{where}: not base64 (nor the index of a row with an image)") from None
    return _open(io.BytesIO(data), where)


def _open(source, where: str) -> Image.Image:
    try:
        return Image.open(source).convert("RGB")
    except FileNotFoundError:
        raise BadRow(f"{where}: no file {source}") from None
    except (UnidentifiedImageError, OSError):
        raise BadRow(f"{where}: not a readable image") from None
