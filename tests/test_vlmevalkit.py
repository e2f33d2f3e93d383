"""ivl's evaluation against VLMEvalKit's conventions, case by case: TSVs as pandas and VLMEvalKit's ``dump`` write
them, its answer reading (``can_infer``, ``YOrN_Extraction``), its metrics, MMBench's circular copies, MME's rating,
POPE, HallusionBench, OCRBench, MMMU and test splits. Every expected value is worked out by hand from VLMEvalKit's
documented rules (docs/evaluation.md lists them), never taken from ivl's output."""

import base64
import csv
import io
import json

import pandas as pd
import pytest
from PIL import Image
from test_evaluate import ScriptedEngine

from ivl.evaluate import answers, scoring
from ivl.evaluate.runner import Options, evaluate_file
from ivl.evaluate.tsv import BadRow, read_tsv

C4 = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def png(color=(255, 0, 0), size=(28, 28)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- TSV files as their producers write them ----------------------------------------------------------------------


def test_a_tsv_written_by_pandas_with_quoted_newlines_tabs_and_quotes_reads_back_as_written(tmp_path):
    question = 'Line one\nline two with a "quote" and a\ttab'
    frame = pd.DataFrame(
        [
            {
                "index": 1,
                "image": png(),
                "question": question,
                "hint": "N/A",
                "A": "yes",
                "B": "None",
                "C": "no",
                "answer": "C",
                "category": "x",
            }
        ]
    )
    frame.to_csv(tmp_path / "p.tsv", sep="\t", index=False)  # pandas quotes the fields that need it
    (item,), skipped = read_tsv(tmp_path / "p.tsv")
    assert item.question == question and not skipped
    assert item.options == {"A": "yes", "C": "no"}  # "None" is missing to pandas, so to VLMEvalKit: not offered
    assert item.hint == ""  # "N/A" likewise: no hint


def test_vlmevalkits_own_dump_quotes_every_field_and_doubles_quotes(tmp_path):
    path = tmp_path / "d.tsv"
    with path.open("w", newline="") as f:  # what VLMEvalKit's dump() writes: to_csv(..., quoting=QUOTE_ALL)
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerow(["index", "image", "question", "A", "B", "answer"])
        writer.writerow(["7", png(), 'Say "hi"?', "1.0", "", "A"])
    text = path.read_text()
    assert text.startswith('"index"\t"image"') and '"Say ""hi""?"' in text
    (item,), _ = read_tsv(path)
    assert item.index == "7" and item.question == 'Say "hi"?' and item.options == {"A": "1.0"}


def test_a_bom_an_unquoted_tab_and_a_duplicate_index(tmp_path):
    bom = tmp_path / "bom.tsv"
    bom.write_text("index\tquestion\tanswer\n1\tq\ta\n", encoding="utf-8-sig")
    assert read_tsv(bom)[0][0].index == "1"
    tab = tmp_path / "tab.tsv"
    tab.write_text("index\tquestion\tanswer\n1\tq\ta\n2\ta\ttab\tb\n3\tq\tc\n")
    with pytest.raises(BadRow, match=r"tab.tsv, line 3: 4 fields where the header has 3"):
        read_tsv(tab)
    items, skipped = read_tsv(tab, skip_bad=True)
    assert [i.index for i in items] == ["1", "3"] and "line 3" in skipped[0]
    twice = tmp_path / "twice.tsv"
    twice.write_text("index\tquestion\tanswer\n1\tq\ta\n1\tr\tb\n")
    with pytest.raises(BadRow, match=r"twice.tsv, line 3 \(index 1\), column index: '1' is also the index of line 2"):
        read_tsv(twice)


def test_image_references_reach_multi_image_rows_and_rows_without_images_are_left_out(tmp_path):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    frame = pd.DataFrame(
        [
            {"index": 1, "image": str([red, blue]), "question": "q1", "answer": "a"},
            {"index": 2, "image": "1", "question": "q2", "answer": "b"},
            {"index": 3, "image": None, "question": "q3", "answer": "c"},
        ]
    )
    frame.to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    items, skipped = read_tsv(tmp_path / "m.tsv")
    assert [i.index for i in items] == ["1", "2"] and "index 3), column image: missing" in skipped[0]
    assert [im.getpixel((0, 0)) for im in items[1].images] == [(255, 0, 0), (0, 0, 255)]


def test_a_test_split_has_no_answers(tmp_path):
    pd.DataFrame([{"index": 1, "question": "q", "A": "x", "B": "y"}]).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    assert read_tsv(tmp_path / "t.tsv")[0][0].answers is None


# ---- answer reading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, choices, letter",
    [
        ("A", C4, "A"),
        ("(A)", C4, "A"),
        ("The answer is A.", C4, "A"),
        ("a", C4, None),
        ("A and B", C4, None),
        ("Cannot determine the answer", C4, None),
        ("cat", C4, "A"),
        ("cat or dog", C4, None),
        ("", C4, None),
        ("The answer is b", C4, "B"),
        ("A cat is sitting on the mat, so the answer is B.", C4, "B"),
        ("Option D is correct because the fish is swimming in the water", C4, None),
        ("The answer is cat", C4, "C"),
        ("A cat.", {"A": "dog", "B": "cat"}, "A"),
        ("15", {"A": "5", "B": "15"}, None),
        ("E", C4, None),
        ("Answer: B", C4, "B"),
        ("<B>", C4, None),
        ("**C**", C4, "C"),
        ("The correct answer is **B**. Here's why: blah blah blah blah blah", C4, "B"),
        ("A A A", C4, "A"),
        ("I think the answer should be A based on the picture", C4, None),
        ("'A'", C4, None),
        ("Cannot determine the answer, maybe fish", C4, None),
        ("answer Z bird cat", {"A": "dog", "B": "cat"}, None),
    ],
)
def test_multiple_choice_reading(output, choices, letter):
    assert answers.read_choice(output, choices) == letter


@pytest.mark.parametrize(
    "output, said",
    [
        ("Yes", "Yes"),
        ("No.", "No"),
        ("yes, it is.", "Yes"),
        ("Yes, there is no dog.", None),
        ("NO", "No"),
        ("Yes:", None),
        ("**Yes**", None),
        ("Yes!", "Yes"),
        ("(yes)", "Yes"),
        ('"Yes"', "Yes"),
        ("Answer: Yes", "Yes"),
        ("yes/no", None),
        ("Yes.No.", None),
        ("Not sure", None),
        ("Nope", None),
        ("", None),
        ("The answer is no", "No"),
        ("Yes\nThe image shows a dog.", "Yes"),
    ],
)
def test_yes_no_reading(output, said):
    assert answers.read_yes_no(output) == said


# ---- metrics ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "references, prediction, expected",
    [
        (["nike"] * 3 + ["nike shoes"] * 7, "Nike", 0.9),
        (["nike"] * 3 + ["nike shoes"] * 7, "The Nike.", 0.9),
        (["2"] * 10, "Two.", 1.0),
        (["5"] * 10, "5.", 0.0),
        (["don't"] * 10, "dont", 1.0),
        (["1000"] * 10, "1,000", 1.0),
        (["red blue"] * 10, "red-blue", 1.0),
        (["red blue"] * 10, "red - blue", 1.0),
        (["nike"] * 10, "Answer: nike", 0.0),
        (["ab"] * 10, "a-b 1,000", 0.0),
        (["none"] * 10, "None", 1.0),
        (["nike"], "nike", 0.0),
        (["nike", "nike"], "nike", 1 / 3),
        (["cat"] * 4 + ["dog"] * 6, "cat", 1.0),
        (["cat"] + ["dog"] * 9, "cat", 0.3),
    ],
)
def test_vqa_accuracy(references, prediction, expected):
    assert scoring.vqa_score(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize(
    "references, prediction, expected",
    [
        (["Nike"], "nike", 1.0),
        (["1999"], "1998", 0.75),
        (["abc"], "ab", 2 / 3),
        (["ab"], "a", 0.5),
        (["abcdef"], "abc", 0.5),
        (["abc"], "xyz", 0.0),
        (["abc", "abcd"], "abcd", 1.0),
        (["abc"], "abd  ", 0.8),
        (["new york"], "New  York", 1.0),
        (["Nike"], "The answer is Nike", 0.0),
    ],
)
def test_anls(references, prediction, expected):
    assert scoring.anls(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize(
    "target, prediction, right",
    [
        ("100", "105", True),
        ("100", "105.1", False),
        ("12", "12.6", True),
        ("50%", "0.5", True),
        ("50%", "52%", True),
        ("50%", "50", False),
        ("0", "0.0", False),
        ("0", "0", True),
        ("Yes", "yes", True),
        ("Yes", "yes.", False),
        ("12", "The answer is 12", False),
        ("1,000", "1000", False),
        ("12 ", "12", True),
        ("12", "  12  ", True),
        ("3.5", "3.5%", False),
        ("Yes ", "yes", False),
        ("45", "47", True),
    ],
)
def test_chartqa_relaxed_accuracy(target, prediction, right):
    assert scoring.relaxed_accuracy(prediction, [target]) == float(right)


def test_relaxed_accuracy_takes_the_best_reference():
    assert scoring.relaxed_accuracy("13.5", ["12", "13"]) == 1.0


@pytest.mark.parametrize(
    "references, prediction, category, hit",
    [
        (["Hello"], "The text says hello.", "Regular Text Recognition", True),
        (["1"], "10", "Digit String Recognition", True),
        (["\\frac{1}{2}"], "$\\frac {1} {2}$", scoring.HMER, True),
        (["\\Frac{1}{2}"], "\\frac{1}{2}", scoring.HMER, False),
        (["stop"], "go", "Scene Text-centric VQA", False),
    ],
)
def test_ocrbench_substring_rule(references, prediction, category, hit):
    assert scoring.ocrbench_hit(prediction, references, category) == float(hit)


# ---- whole benchmarks through the runner --------------------------------------------------------------------------


def answer_by(table: dict[str, str], default="I am not sure"):
    """An engine rule: the output for the first key found in the prompt."""
    return lambda text: next((v for k, v in table.items() if k in text), default)


def mmbench_file(path):
    """Eight questions as MMBench's DEV file holds them: copy k of question g is row g + k x 1,000,000 with the
    options rotated by k and the answer moved with them; one question of four options, seven of three: 25 rows."""
    rows = []
    for g in range(8):
        texts = ["right", "wrong one", "wrong two", "wrong three"][: 4 if g == 0 else 3]
        for k in range(len(texts)):
            shown = texts[k:] + texts[:k]  # rotated: option j of copy k is option j + k of copy 0
            row = {
                "index": g + k * 1_000_000,
                "image": png(),
                "question": f"Question {g}?",
                "answer": "ABCD"[shown.index("right")],
                "category": "c1" if g < 4 else "c2",
                "split": "dev",
                "l2-category": "coarse_perception",
            }
            row.update(dict(zip("ABCD", shown)))
            rows.append(row)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def mmbench_rule(text):
    """Right on every copy of questions 0-4; on questions 5-7 it always says A, right only on copy 0."""
    question = int(text.split("Question ")[1][0])
    options = {line[0]: line[3:] for line in text.split("\n") if line[1:3] == ". "}
    right = next(letter for letter, option in options.items() if option == "right")
    return right if question < 5 else "A"


def test_mmbench_dev_with_its_circular_copies_scores_as_vlmevalkit(tmp_path):
    """25 rows, 8 questions: 5 right on every copy, 3 wrong on some: 5 / 8 = 0.625, with or without --circular,
    asking each row once (the copies are not rotated again)."""
    tsv = mmbench_file(tmp_path / "MMBench_DEV_EN.tsv")
    for circular in (False, True):
        engine = ScriptedEngine(mmbench_rule)
        scores = evaluate_file(engine, tsv, tmp_path / f"out{circular}", Options(circular=circular))
        assert len(engine.asked) == 25
        assert scores["dataset"] == "MMBench" and scores["circular"] and scores["items"] == 8
        assert scores["score"] == 0.625
        assert scores["categories"] == {"c1": 1.0, "c2": 0.25}  # c1: questions 0-3; c2: 4 right, 5-7 wrong
        assert scores["splits"]["dev"]["overall"] == 0.625
        assert scores["l2_categories"] == {"coarse_perception": 0.625}
    written = pd.read_csv(tmp_path / "outTrue" / "predictions.tsv", sep="\t")  # VLMEvalKit's prediction file
    assert len(written) == 25 and "image" not in written and {"prediction", "answer", "A"} <= set(written)


def test_a_question_whose_first_copy_is_missing_is_not_scored(tmp_path):
    tsv = mmbench_file(tmp_path / "MMBench_DEV_EN.tsv")
    frame = pd.read_csv(tsv, sep="\t")
    frame[frame["index"] != 7].to_csv(tsv, sep="\t", index=False)  # question 7's copy 0
    assert evaluate_file(ScriptedEngine(mmbench_rule), tsv, tmp_path / "o", Options())["items"] == 7


def test_mmbench_test_without_answers_gives_predictions_for_the_server(tmp_path):
    tsv = mmbench_file(tmp_path / "MMBench_TEST_EN.tsv")
    pd.read_csv(tsv, sep="\t").drop(columns=["answer"]).to_csv(tsv, sep="\t", index=False)
    scores = evaluate_file(ScriptedEngine(mmbench_rule), tsv, tmp_path / "o", Options())
    assert scores["score"] is None and scores["predictions_only"]
    written = pd.read_csv(tmp_path / "o" / "predictions.tsv", sep="\t")
    assert len(written) == 25 and written["prediction"].notna().all()


def mme_file(path):
    """Two categories of MME, two images each, a Yes and a No question per image."""
    rows, index = [], 0
    for category in ("color", "OCR"):
        for image in range(2):
            for answer in ("Yes", "No"):
                rows.append(
                    {
                        "index": index,
                        "image": png(),
                        "image_path": f"{category}/{image}.png",
                        "question": f"{category} {image} {answer}? Please answer yes or no.",
                        "answer": answer,
                        "category": category,
                    }
                )
                index += 1
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_mme_sends_the_question_alone_reads_yes_no_and_rates_acc_plus_acc_plus(tmp_path):
    """color: image 0 both right, image 1 only its Yes question: acc 3/4, acc+ 1/2, 100 x 1.25 = 125. OCR: both
    images both right: 200. Perception 325 (eight categories missing, counted 0), reasoning 0."""
    outputs = {
        "color 0 Yes": "Yes.",
        "color 0 No": "No, it is not.",
        "color 1 Yes": "Yes, the image is red.",
        "color 1 No": "Yes",
        "OCR 0 Yes": "yes",
        "OCR 0 No": "no",
        "OCR 1 Yes": "Yes",
        "OCR 1 No": "No",
    }
    engine = ScriptedEngine(answer_by(outputs))
    scores = evaluate_file(engine, mme_file(tmp_path / "MME.tsv"), tmp_path / "o", Options())
    assert all(
        text.endswith("? Please answer yes or no.<|im_end|>\n<|im_start|>assistant\n") for text in engine.asked
    )  # no "Answer the question using a single word or phrase."
    assert scores["metric"] == "yes_no" and scores["score"] == 7 / 8
    assert scores["mme"]["categories"] == {"color": pytest.approx(125.0), "OCR": pytest.approx(200.0)}
    assert scores["mme"]["perception"] == pytest.approx(325.0) and scores["mme"]["reasoning"] == 0.0
    assert scores["headline"]["value"] == pytest.approx(325.0) and len(scores["mme"]["missing"]) == 12


def test_docvqa_and_chartqa_get_their_metrics_from_the_name(tmp_path):
    rows = [{"index": 1, "image": png(), "question": "Total?", "answer": "['45']"}]
    pd.DataFrame(rows).to_csv(tmp_path / "ChartQA_TEST.tsv", sep="\t", index=False)
    chart = evaluate_file(ScriptedEngine(lambda t: "47"), tmp_path / "ChartQA_TEST.tsv", tmp_path / "c", Options())
    assert chart["metric"] == "relaxed" and chart["score"] == 1.0  # 47 is within 5% of 45
    rows = [{"index": 1, "image": png(), "question": "Date?", "answer": "['March 3, 1999', '3 March 1999']"}]
    pd.DataFrame(rows).to_csv(tmp_path / "DocVQA_VAL.tsv", sep="\t", index=False)
    doc = evaluate_file(
        ScriptedEngine(lambda t: "March 3, 1999"), tmp_path / "DocVQA_VAL.tsv", tmp_path / "d", Options()
    )
    assert doc["metric"] == "anls" and doc["score"] == 1.0
    asked = ScriptedEngine(lambda t: "x")
    evaluate_file(asked, tmp_path / "DocVQA_VAL.tsv", tmp_path / "e", Options())
    assert "Date?\nAnswer the question using a single word or phrase." in asked.asked[0]
    explicit = evaluate_file(
        ScriptedEngine(lambda t: "March 3, 1999"), tmp_path / "DocVQA_VAL.tsv", tmp_path / "f", Options(metric="vqa")
    )
    assert explicit["metric"] == "vqa" and explicit["score"] == pytest.approx(1 / 6)  # (0 + 1/3) / 2


def test_pope_f1_and_hallusionbench_figure_and_question_accuracy(tmp_path):
    pope = [
        {"index": i, "image": png(), "question": f"q{i}", "answer": a, "category": c}
        for i, (a, c) in enumerate(
            [("Yes", "random"), ("Yes", "random,popular"), ("No", "popular"), ("No", "adversarial")]
        )
    ]
    pd.DataFrame(pope).to_csv(tmp_path / "POPE.tsv", sep="\t", index=False)
    said = {"q0": "Yes", "q1": "Unsure", "q2": "No", "q3": "No"}
    scores = evaluate_file(ScriptedEngine(answer_by(said)), tmp_path / "POPE.tsv", tmp_path / "p", Options())
    # five rows once exploded: truth 1,1,1,0,0 and said 1,0,0,0,0: tp 1, fp 0, fn 2: P 1, R 1/3, F1 0.5
    assert scores["pope"]["Overall"]["f1"] == pytest.approx(0.5)
    assert scores["pope"]["Overall"]["accuracy"] == pytest.approx(3 / 5)
    assert scores["pope"]["random"]["f1"] == pytest.approx(2 / 3) and scores["pope"]["popular"]["f1"] == 0.0
    hall = [
        {"index": f"VD_x_y_0_{f}_{q}", "image": png(), "question": f"h{f}{q}", "answer": "Yes", "l2-category": "ocr"}
        for f in (0, 1)
        for q in (0, 1)
    ]
    pd.DataFrame(hall).to_csv(tmp_path / "HallusionBench.tsv", sep="\t", index=False)
    said = {"h00": "Yes", "h01": "Yes", "h10": "Yes", "h11": "No"}
    scores = evaluate_file(ScriptedEngine(answer_by(said)), tmp_path / "HallusionBench.tsv", tmp_path / "h", Options())
    assert scores["hallusion"] == {"aAcc": 0.75, "fAcc": 0.5, "qAcc": 0.5}


def test_ocrbench_counts_hits_out_of_its_questions(tmp_path):
    rows = [
        {"index": i, "image": png(), "question": f"o{i}", "answer": str([ref]), "category": c}
        for i, (ref, c) in enumerate(
            [
                ("Hello", "Regular Text Recognition"),
                ("42", "Digit String Recognition"),
                ("Stop", "Scene Text-centric VQA"),
            ]
        )
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "OCRBench.tsv", sep="\t", index=False)
    said = {"o0": "It says HELLO", "o1": "4 2", "o2": "stop sign"}
    scores = evaluate_file(ScriptedEngine(answer_by(said)), tmp_path / "OCRBench.tsv", tmp_path / "o", Options())
    assert scores["ocrbench"]["Text Recognition"] == 1 and scores["ocrbench"]["Scene Text-centric VQA"] == 1
    assert scores["ocrbench"]["Final Score"] == 2 and scores["score"] == pytest.approx(2 / 3)


def test_mmmu_places_its_images_scores_open_questions_by_their_text_and_reports_validation(tmp_path):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    rows = [
        {
            "index": 1,
            "image": str([red, blue]),
            "question": "Which <image 2> matches <image 1>?",
            "A": "left",
            "B": "right",
            "answer": "B",
            "split": "validation",
        },
        {"index": 2, "image": red, "question": "How many?", "answer": "42", "split": "validation"},
        {"index": 3, "image": red, "question": "How many more?", "answer": "7", "split": "dev"},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "MMMU_DEV_VAL.tsv", sep="\t", index=False)
    seen = []
    engine = ScriptedEngine(answer_by({"Which": "B", "How many?": "The answer is 42", "more": "24"}))
    generate = engine.generate
    engine.generate = lambda batch: (seen.extend(batch), generate(batch))[1]
    scores = evaluate_file(engine, tmp_path / "MMMU_DEV_VAL.tsv", tmp_path / "m", Options())
    first = seen[0]
    assert first.text.index("Which") < first.text.index("<|image_pad|>") < first.text.index("matches")
    assert [im.getpixel((0, 0)) for im in first.images] == [(0, 0, 255), (255, 0, 0)]  # image 2, then image 1
    assert "Question: How many?\n<|im_end|>" in seen[1].text  # open: no options, no instruction
    assert scores["splits"]["validation"]["overall"] == 1.0 and scores["splits"]["dev"]["overall"] == 0.0
    assert scores["headline"] == {"name": "validation split", "value": 1.0, "unit": "fraction"}


def test_resuming_into_another_models_or_settings_folder_is_refused_in_one_line(tmp_path):
    from ivl.errors import UsageError

    tsv = mmbench_file(tmp_path / "MMBench_DEV_EN.tsv")
    evaluate_file(ScriptedEngine(mmbench_rule), tsv, tmp_path / "o", Options(), model="runs/a/model")
    assert json.loads((tmp_path / "o" / "fingerprint.json").read_text())["model"] == "runs/a/model"
    with pytest.raises(
        UsageError,
        match=r"holds predictions of another run \(model was 'runs/a/model', is now "
        r"'runs/b/model'\); pass another --out",
    ):
        evaluate_file(ScriptedEngine(mmbench_rule), tsv, tmp_path / "o", Options(), model="runs/b/model")
    with pytest.raises(UsageError, match=r"another run \(benchmark was"):
        evaluate_file(ScriptedEngine(mmbench_rule), tsv, tmp_path / "o", Options(metric="exact"), model="runs/a/model")
    again = ScriptedEngine(mmbench_rule)
    assert evaluate_file(again, tsv, tmp_path / "o", Options(), model="runs/a/model")["score"] == 0.625
    assert not again.asked  # the same run: everything resumed


MCQ_ROW = {"A": "cat", "B": "dog", "answer": "B", "question": "Which?"}
VQA_ROW = {"answer": str(["dog"] * 10), "question": "Which?"}


@pytest.mark.parametrize(
    "name, row, dataset, metric",
    [
        ("MMStar", MCQ_ROW, "MMStar", "mcq"),
        ("SEEDBench_IMG", MCQ_ROW, "SEED-Bench", "mcq"),
        ("ScienceQA_TEST", dict(MCQ_ROW, hint="Animals bark."), "ScienceQA", "mcq"),
        ("AI2D_TEST", MCQ_ROW, "AI2D", "mcq"),
        ("RealWorldQA", MCQ_ROW, "RealWorldQA", "mcq"),
        ("MMBench_DEV_EN_V11", MCQ_ROW, "MMBench", "mcq"),
        ("TextVQA_VAL", VQA_ROW, "TextVQA", "vqa"),
        ("InfoVQA_VAL", {"answer": "['dog']", "question": "Which?"}, "InfoVQA", "anls"),
        (
            "MathVista_MINI",
            {
                "answer": "dog",
                "question": "Which?",
                "question_type": "multi_choice",
                "answer_type": "text",
                "choices": "['cat', 'dog']",
            },
            "MathVista",
            "mathvista",
        ),
        (
            "MathVista_MINI",
            {
                "answer": "3",
                "question": "How many?",
                "question_type": "free_form",
                "answer_type": "integer",
                "choices": None,
            },
            "MathVista",
            "mathvista",
        ),
        ("my_own_benchmark", MCQ_ROW, "auto", "mcq"),
    ],
)
def test_every_benchmark_of_the_table_evaluates_a_pandas_written_file(tmp_path, name, row, dataset, metric):
    pd.DataFrame([dict(row, index=1, image=png(), category="c")]).to_csv(
        tmp_path / f"{name}.tsv", sep="\t", index=False
    )
    engine = ScriptedEngine(
        lambda text: "3" if "How many" in text else "The answer is B." if "B. dog" in text else "dog"
    )
    scores = evaluate_file(engine, tmp_path / f"{name}.tsv", tmp_path / "o", Options())
    assert (scores["dataset"], scores["metric"], scores["score"]) == (dataset, metric, 1.0)
