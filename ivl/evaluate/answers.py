"""Reading the answer out of a model's output by VLMEvalKit's exact-matching rules (its ``--judge exact_matching``;
no LLM judge): ``can_infer`` for multiple choice and ``YOrN_Extraction`` for yes/no, as they stand since 2026-06
(VLMEvalKit's ``matching_util`` with the "answer is X" fallback).

Multiple choice: a choice letter standing alone as a token among the last four ("A", "A.", "(A)", "**B**",
"Answer: C"), else "answer is X" for X in A-D, else exactly one option's text inside an output at most twice as long
as all option texts together. Anything else, two letters among them, is unreadable (None): it scores 0 and is
counted. Where VLMEvalKit reads its wrong-answer letter Z (a refusal such as "Cannot determine the answer", or a lone
"Z" token and no option letter), the output is unreadable here, which scores the same.
"""

from __future__ import annotations

import re

from ivl.evaluate.scoring import punctuation

_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def read_choice(output: str, options: dict[str, str]) -> str | None:
    """The option letter ``output`` picks among ``options`` ({letter: text}), or None when it cannot be read."""
    if any(phrase in output for phrase in _REFUSALS):
        return None  # VLMEvalKit's Z
    if "Failed to obtain answer via API" not in output:
        tokens = output.translate(_SEPARATORS).split()
        found = [letter for letter in options if letter in tokens]
        if len(found) == 1 and tokens.index(found[0]) > len(tokens) - 5:  # a lone letter among the last four tokens
            return found[0]
        if not found and "Z" in tokens:
            return None  # VLMEvalKit's Z
        said = _ANSWER_IS.search(output)
        if said and said.group(1).upper() in options:
            return said.group(1).upper()
    lowered = output.lower()
    if len(lowered) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    matches = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def read_yes_no(output: str) -> str | None:
    """ "Yes" or "No" when the output has exactly one of the words yes and no (after VQA punctuation processing,
    lower-cased), else None: "Yes, there is no dog." and "**Yes**" are unreadable, as in VLMEvalKit."""
    words = punctuation(output.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return None


def read_open(output: str) -> str:
    """An open answer as scored: the output without surrounding whitespace (the metrics normalise the rest)."""
    return output.strip()
