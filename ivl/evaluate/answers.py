"""Reading the answer out of a model's output, by VLMEvalKit's exact-matching rules (no LLM judge).

Multiple choice (``can_infer_option``, then ``can_infer_text`` in VLMEvalKit's ``matching_util``): a choice letter
standing alone as a token near the end ("A", "A.", "(A)", "**B**", "Answer: C"), else "the answer is X", else
exactly one option's text inside a short enough output. Anything else, or two letters, is unreadable (None): it
scores 0 and is counted as unreadable.
"""

from __future__ import annotations

import re

_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([A-Z])\**")


def read_choice(output: str, options: dict[str, str]) -> str | None:
    """The option letter ``output`` picks among ``options`` ({letter: text}), or None when it cannot be read."""
    tokens = output.translate(_SEPARATORS).split()
    found = [letter for letter in options if letter in tokens]
    if len(found) == 1 and tokens.index(found[0]) > len(tokens) - 5:  # a lone letter, near the end
        return found[0]
    said = _ANSWER_IS.search(output)
    if said and said.group(1).upper() in options:
        return said.group(1).upper()
    lowered = output.lower()
    if len(lowered) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    matches = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def read_open(output: str) -> str:
    """An open answer as scored: the output without surrounding whitespace (the metrics normalise the rest)."""
    return output.strip()
