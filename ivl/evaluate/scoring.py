"""Per-question scores by VLMEvalKit's rules: VQA soft accuracy (TextVQA), ANLS (DocVQA, InfoVQA), relaxed accuracy
(ChartQA), exact match (OCRVQA, GQA), OCRBench's substring rule, and MathVista's exact-match part.

Each takes the model's raw output, as VLMEvalKit's evaluators take the prediction column: what a metric strips or
normalises, it strips itself (ANLS divides by the raw lengths, ChartQA strips the prediction and not the reference).
Written by hand: no kept library implements the VQA normalisation or ChartQA's relaxed accuracy (torchmetrics has
the edit distance that ANLS is built on, which is used).
"""

from __future__ import annotations

import re

from torchmetrics.functional.text import edit_distance

METRICS = ("mcq", "vqa", "anls", "relaxed", "exact", "yes_no", "ocrbench", "mathvista")

# ---- VQA soft accuracy (the VQA challenge's answer normalisation and its min(1, matches / 3) rule) --------------

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a full stop not next to a digit
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def punctuation(text: str) -> str:
    """The VQA challenge's punctuation step: a mark next to a space (or any mark, once the text has a digit-comma-
    digit) is deleted, any other is a space; full stops not next to a digit are deleted (at most 32 of them: the
    challenge's code passes a flag where ``re.sub`` takes its count, and VLMEvalKit keeps that)."""
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def normalise_vqa(text: str) -> str:
    """The VQA challenge's answer processing: punctuation, then number words, articles and contractions."""
    out = punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in out.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, references: list[str]) -> float:
    """Mean over the references of min(1, #other references equal to the prediction / 3), the official VQA
    accuracy as VLMEvalKit computes it. With one reference there is no other one: 0 whatever the answer
    (TextVQA has ten per question)."""
    pred = normalise_vqa(prediction)
    refs = [normalise_vqa(r) for r in references]
    return sum(min(1.0, sum(r == pred for r in refs[:i] + refs[i + 1 :]) / 3) for i in range(len(refs))) / len(refs)


# ---- ANLS (DocVQA, InfoVQA): average normalised Levenshtein similarity, threshold 0.5 --------------------------


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """1 - the smallest normalised edit distance to a reference, or 0 when that similarity is below ``threshold``
    (0.5 itself counts, as in VLMEvalKit; the ST-VQA definition gives 0 there). The distance is between the
    lower-cased, whitespace-collapsed strings; it is divided by the longer of the raw strings, as VLMEvalKit does,
    so whitespace around a prediction lowers its distance."""
    pred = " ".join(prediction.lower().split())
    distances = []
    for ref in references:
        longest = max(len(ref), len(prediction))
        distance = float(edit_distance([pred], [" ".join(ref.lower().split())]))
        distances.append(0.0 if longest == 0 else distance / longest)
    similarity = 1 - min(distances)
    return similarity if similarity >= threshold else 0.0


# ---- ChartQA relaxed accuracy -------------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: list[str], tolerance: float = 0.05) -> float:
    """ChartQA: a number within ``tolerance`` of a non-zero numeric reference, relative to the reference ("50%"
    reads as 0.5; "1,000" is not a number); otherwise the stripped prediction must equal the reference as written,
    case-insensitive. 1.0 when any reference accepts it."""
    prediction = prediction.strip()
    for ref in references:
        p, r = _number(prediction), _number(ref)
        if p is not None and r:
            ok = abs(p - r) / abs(r) <= tolerance
        else:
            ok = prediction.lower() == ref.lower()
        if ok:
            return 1.0
    return 0.0


def exact_match(prediction: str, references: list[str], reduce=max) -> float:
    """Case-insensitive equality after stripping whitespace (VLMEvalKit's ``accuracy``): the best reference
    (OCRVQA) or the mean over them (``reduce=mean``, GQA)."""
    pred = prediction.strip().lower()
    return float(reduce([float(pred == r.strip().lower()) for r in references]))


# ---- OCRBench -------------------------------------------------------------------------------------------------

HMER = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(prediction: str, references: list[str], category: str) -> float:
    """1.0 when a reference is a substring of the prediction: case-insensitive, or, for handwritten mathematical
    expressions, case-sensitive with every space removed."""

    def clean(text: str) -> str:
        text = text.strip().replace("\n", " ")
        return text.replace(" ", "") if category == HMER else text.lower()

    pred = clean(prediction)
    return float(any(clean(ref) in pred for ref in references))


def score(metric: str, prediction: str, references: list[str]) -> float:
    return {"vqa": vqa_score, "anls": anls, "relaxed": relaxed_accuracy, "exact": exact_match}[metric](
        prediction, references
    )
