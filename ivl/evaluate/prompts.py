"""Prompts as VLMEvalKit's datasets build them (its generic prompts, which its Qwen2.5-VL entries use).

- ``mcq`` (``ImageMCQDataset``): ``Hint: ...`` (when there is one), ``Question: ...``, ``Options:`` with one
  ``A. ...`` line per option, then "Please select the correct answer from the options above. \\n".
- ``vqa`` (``ImageVQADataset``: TextVQA, DocVQA, InfoVQA, ChartQA, ...): the question and
  "\\nAnswer the question using a single word or phrase."
- ``plain`` (MME, POPE, HallusionBench, OCRBench, MathVista): the question alone.
- ``mmmu``: the ``mcq`` text with each ``<image N>`` replaced by the N-th image where it stands (images never named
  are left out); open questions have no options and so no instruction.

Images come first in the user turn, as VLMEvalKit sends them (``mmmu`` places them).
"""

from __future__ import annotations

import re

from PIL import Image

from ivl.evaluate.tsv import Item

MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
VQA_INSTRUCTION = "\nAnswer the question using a single word or phrase."
_IMAGE_TAG = re.compile(r"<image ([1-9])>")


def rotate(options: dict[str, str], rotation: int) -> dict[str, str]:
    """The options with their labels rotated as VLMEvalKit's circular copies: in copy ``i`` the option at label
    ``j`` moves to label ``j - i`` (mod the number of options)."""
    labels = list(options)
    k = len(labels)
    moved = {labels[(j - rotation) % k]: options[label] for j, label in enumerate(labels)}
    return {label: moved[label] for label in labels}


def mcq_text(item: Item, rotation: int = 0) -> str:
    prompt = f"Hint: {item.hint}\n" if item.hint else ""
    prompt += f"Question: {item.question}\n"
    if item.options:
        prompt += "Options:\n" + "".join(
            f"{label}. {option}\n" for label, option in rotate(item.options, rotation).items()
        )
        prompt += MCQ_INSTRUCTION
    return prompt


def text(item: Item, kind: str, rotation: int = 0) -> str:
    if kind in ("mcq", "mmmu"):
        return mcq_text(item, rotation)
    return item.question + (VQA_INSTRUCTION if kind == "vqa" else "")


def build(item: Item, kind: str, rotation: int = 0) -> tuple[list[dict], list[Image.Image]]:
    """(chat messages for the chat template, the images they hold in order)."""
    prompt = text(item, kind, rotation)
    if kind == "mmmu" and _IMAGE_TAG.search(prompt):
        content, images = [], []
        pieces = _IMAGE_TAG.split(prompt)  # text, number, text, number, ...
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                content.append({"type": "text", "text": piece})
            elif int(piece) <= len(item.images):
                content.append({"type": "image"})
                images.append(item.images[int(piece) - 1])
        return [{"role": "user", "content": [c for c in content if c.get("text") != ""]}], images
    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}], list(item.images)
