"""Benchmarks in VLMEvalKit's TSV format, read the way VLMEvalKit reads them: one row per question.

VLMEvalKit loads a benchmark with ``pandas.read_csv(path, sep="\\t")`` and pandas' defaults, and so does this module:
a field may be quoted (holding tabs, newlines, doubled quotes), a UTF-8 byte-order mark is dropped, and a cell that
is exactly one of pandas' missing-value strings ("", "NA", "N/A", "None", "nan", "null", ...) is missing: a missing
option is not offered, a missing hint is no hint. Then, as VLMEvalKit's ``ImageBaseDataset``: in a file with an
``image`` column, rows without an image are left out; an image of at most 64 characters is the ``index`` of the row
whose image it shares; an image (or ``image_path``) that reads as ``[...]`` is a list of images.

Columns: ``index`` and ``question`` are required. ``answer`` may be absent (a test split, whose answers only the
benchmark's server holds): the run then writes predictions without a score. Options are the columns ``A``..``Z``;
``hint``, ``category``, ``l2-category``, ``split`` and ``video`` (a file under ``media_root``) are optional; every
column but the image is kept as text in ``Item.row`` (MME's ``image_path``, MathVista's ``question_type``, ...).
Open-answer references may be a Python list literal of several answers.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import re
import string
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

REQUIRED = ("index", "question")
OPTION_LETTERS = tuple(string.ascii_uppercase)


class BadRow(ValueError):
    """A row that cannot be evaluated; the message names the file, the line, the index and the column."""


@dataclass
class Item:
    index: str
    question: str
    answers: list[str] | None  # one reference, or several (VQA-style); None: the file has no answers (a test split)
    images: list[Image.Image] = field(default_factory=list)
    video: Path | None = None
    hint: str = ""
    options: dict[str, str] = field(default_factory=dict)  # letter -> text, in letter order
    category: str = ""
    l2_category: str = ""
    split: str = ""
    row: dict[str, str] = field(default_factory=dict)  # every column but the image, as text ("" where missing)

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


def list_or_one(value: str) -> list[str]:
    """VLMEvalKit's ``toliststr``: a value written as a Python list literal is its elements, anything else itself."""
    if len(value) > 1 and value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [value]


def read_tsv(
    path: str | Path, media_root: str | Path | None = None, skip_bad: bool = False
) -> tuple[list[Item], list[str]]:
    """(items, skipped): every row as an ``Item``; with ``skip_bad`` rows that cannot be read are left out and
    their errors returned, otherwise the first one is raised as ``BadRow``. Rows without an image in a file with an
    ``image`` column are left out (and listed in ``skipped``) either way, as VLMEvalKit leaves them out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    table, skipped = _read(path, skip_bad)
    columns = [str(c) for c in table.columns]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise BadRow(f"{path}: missing column(s) {missing}; a VLMEvalKit TSV needs {list(REQUIRED)} (has {columns})")
    lines = _record_lines(path)
    records = table.to_dict("records")
    lines = lines if len(lines) == len(records) else [None] * len(records)
    for record, line in zip(records, lines):
        record["_line"] = line
    if "image" in columns:  # VLMEvalKit's skip_noimg
        kept = [r for r in records if not _missing(r["image"])]
        skipped += [
            f"{_where(path, r)}, column image: missing (left out, as VLMEvalKit leaves it out)"
            for r in records
            if _missing(r["image"])
        ]
        records = kept
    images_by_index = {_text(r["index"]): _text(r["image"]) for r in records if "image" in r}
    seen: dict[str, object] = {}
    letters = [c for c in OPTION_LETTERS if c in columns]
    items = []
    for record in records:
        try:
            index = _text(record["index"])
            if index in seen:
                raise BadRow(f"{_where(path, record)}, column index: {index!r} is also the index of line {seen[index]}")
            seen[index] = record["_line"]
            items.append(_item(record, path, letters, images_by_index, media_root, "answer" in columns))
        except BadRow as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
    return items, skipped


def _read(path: Path, skip_bad: bool) -> tuple[pd.DataFrame, list[str]]:
    """pandas' defaults, as VLMEvalKit; a row with more fields than the header (an unquoted tab inside a field)
    is an error naming its line, or with ``skip_bad`` one skipped line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        try:
            table = pd.read_csv(path, sep="\t", on_bad_lines="warn" if skip_bad else "error")
        except pd.errors.ParserError as error:
            found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(error))
            if not found:
                raise BadRow(f"{path}: {error}") from None
            expected, line, saw = found.groups()
            raise BadRow(
                f"{path}, line {line}: {saw} fields where the header has {expected} (a tab inside a field "
                f"that is not quoted? quote it, as pandas' to_csv does)"
            ) from None
        except (UnicodeDecodeError, pd.errors.EmptyDataError) as error:
            raise BadRow(f"{path}: not a UTF-8 TSV file ({error})") from None
    skipped = [
        f"{path}, {line.strip().replace('Skipping line', 'line')}"
        for w in caught
        for line in str(w.message).splitlines()
        if line.strip().startswith("Skipping line")
    ]
    return table, skipped


def _record_lines(path: Path) -> list[int]:
    """The line each record starts on (a quoted field may span lines), for error messages."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    lines = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            next(reader)
            start = reader.line_num + 1
            for row in reader:
                if row:
                    lines.append(start)
                start = reader.line_num + 1
        except (csv.Error, StopIteration):
            return []
    return lines


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _text(value) -> str:
    """A cell as VLMEvalKit's ``str(x)`` would show it; missing cells are ""."""
    return "" if _missing(value) else str(value)


def _where(path: Path, record: dict) -> str:
    line = f"line {record['_line']}" if record.get("_line") else "a row"
    return f"{path}, {line} (index {_text(record.get('index'))})"


def _item(record, path, letters, images_by_index, media_root, has_answers) -> Item:
    where = _where(path, record)
    if not _text(record["index"]):
        raise BadRow(f"{where}, column index: missing")
    question = _text(record["question"])
    if not question.strip():
        raise BadRow(f"{where}, column question: missing")
    options = {c: _text(record[c]) for c in letters if not _missing(record[c])}
    answers = None
    if has_answers:
        # a missing answer reads as VLMEvalKit's str(nan): "nan"
        answers = list_or_one(str(record["answer"]).strip() if not _missing(record["answer"]) else "nan")
        if options and answers[0] not in options:
            raise BadRow(f"{where}, column answer: {answers[0]!r} is not one of its options {list(options)}")
    images = []
    if "image" in record:
        value = _text(record["image"])
        if len(value) <= 64:  # the index of the row whose image this row shares
            if len(images_by_index.get(value, "")) <= 64:
                raise BadRow(f"{where}, column image: {value!r} is neither base64 nor the index of a row with an image")
            value = images_by_index[value]
        for k, one in enumerate(list_or_one(value)):
            images.append(_decode_base64(one, f"{where}, column image" + (f"[{k}]" if k else "")))
    elif not _missing(record.get("image_path")):
        for value in list_or_one(_text(record["image_path"])):
            images.append(_open(_resolve(value, path, media_root), f"{where}, column image_path"))
    video = None
    if not _missing(record.get("video")):
        if media_root is None:
            raise BadRow(f"{where}, column video: names {record['video']!r}; pass --media-root with the videos")
        video = Path(media_root) / _text(record["video"])
        if not video.is_file():
            raise BadRow(f"{where}, column video: no file {video}")
    row = {str(k): _text(v) for k, v in record.items() if k not in ("image", "_line")}
    return Item(
        index=_text(record["index"]),
        question=question,
        answers=answers,
        images=images,
        video=video,
        hint=_text(record.get("hint")),
        options=options,
        category=_text(record.get("category")),
        l2_category=_text(record.get("l2-category")),
        split=_text(record.get("split")),
        row=row,
    )


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
