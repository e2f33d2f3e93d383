"""Prompts as VLMEvalKit builds them for image benchmarks (``ImageMCQDataset`` / ``ImageVQADataset``).

Multiple choice: ``Hint: ...`` (when there is one), ``Question: ...``, ``Options:`` with one ``A. ...`` line per
option, then VLMEvalKit's instruction. Open answer: the question and "Answer the question using a single word or
phrase." Images come first in the user turn, as VLMEvalKit sends them.
"""

from __future__ import annotations

from PIL import Image

from ivl.evaluate.tsv import Item

MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
VQA_INSTRUCTION = "\nAnswer the question using a single word or phrase."


def rotate(options: dict[str, str], rotation: int) -> dict[str, str]:
    """The options with their labels rotated as VLMEvalKit's circular copies: in copy ``i`` the option at label
    ``j`` moves to label ``j - i`` (mod the number of options)."""
    labels = list(options)
    k = len(labels)
    moved = {labels[(j - rotation) % k]: options[label] for j, label in enumerate(labels)}
    return {label: moved[label] for label in labels}


def text(item: Item, rotation: int = 0) -> str:
    if not item.multiple_choice:
        return item.question + VQA_INSTRUCTION
    prompt = f"Hint: {item.hint}\n" if item.hint.strip() else ""
    prompt += f"Question: {item.question}\nOptions:\n"
    prompt += "".join(f"{label}. {option}\n" for label, option in rotate(item.options, rotation).items())
    return prompt + MCQ_INSTRUCTION


def build(item: Item, rotation: int = 0) -> tuple[list[dict], list[Image.Image]]:
    """(chat messages for the chat template, the images they hold in order)."""
    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text(item, rotation)}]
    return [{"role": "user", "content": content}], list(item.images)
