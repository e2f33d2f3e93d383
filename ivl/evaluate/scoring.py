"""Per-item scores of the benchmarks' official rules: VQA soft accuracy, ANLS, ChartQA's relaxed accuracy, exact
match, and multiple choice by the letter read from the output (``answers.read_choice``).

Written by hand: no kept library implements the VQA normalisation or ChartQA's relaxed accuracy (torchmetrics has
the edit distance that ANLS is built on, which is used).
"""

from __future__ import annotations

import re

from torchmetrics.functional.text import edit_distance

METRICS = ("mcq", "vqa", "anls", "relaxed", "exact")

# ---- VQA soft accuracy (the VQA challenge's answer normalisation and its min(1, matches / 3) rule) --------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id": "I'd", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "oclock": "o'clock", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whats": "what's",
    "whered": "where'd", "wheres": "where's", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a full stop not inside a number
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def normalise_vqa(text: str) -> str:
    """The VQA challenge's answer processing: punctuation, then number words, articles and contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, references: list[str]) -> float:
    """min(1, #other references equal to the prediction / 3), averaged over the references left out one at a
    time (the official VQA accuracy, as VLMEvalKit computes it). One reference: normalised exact match
    (VLMEvalKit's rule gives such an item 0 whatever the answer, which no user wants)."""
    pred = normalise_vqa(prediction)
    refs = [normalise_vqa(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


# ---- ANLS (DocVQA, InfoVQA, OCR): average normalised Levenshtein similarity, threshold 0.5 --------------------

def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """max over references of 1 - edit distance / longer length (lower-cased, whitespace collapsed), 0 when that
    similarity is below ``threshold`` (0.5 itself counts). VLMEvalKit divides by the raw strings' lengths, so
    whitespace around a prediction lowers its distance there; here both lengths are of the normalised strings."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in references:
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        similarity = 1.0 if longest == 0 else 1 - float(edit_distance([pred], [ref])) / longest
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


# ---- ChartQA relaxed accuracy -------------------------------------------------------------------------------------

def _number(text: str) -> float | None:
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1].strip()) / 100
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: list[str], tolerance: float = 0.05) -> float:
    """ChartQA: a number within ``tolerance`` relative error of a non-zero numeric reference is right ("50%"
    reads as 0.5; "1,000" is not a number); otherwise the strings must match, case-insensitive."""
    for ref in references:
        p, r = _number(prediction), _number(ref)
        if p is not None and r:
            ok = abs(p - r) / abs(r) <= tolerance
        else:
            ok = prediction.strip().lower() == ref.strip().lower()
        if ok:
            return 1.0
    return 0.0


def exact_match(prediction: str, references: list[str]) -> float:
    """Case-insensitive equality after stripping whitespace (VLMEvalKit's ``accuracy``: OCRVQA, GQA)."""
    pred = prediction.strip().lower()
    return float(any(pred == r.strip().lower() for r in references))


def score(metric: str, prediction: str, references: list[str]) -> float:
    return {"vqa": vqa_score, "anls": anls, "relaxed": relaxed_accuracy, "exact": exact_match}[metric](
        prediction, references)
