"""Benchmark evaluation: scoring rules and answer reading against hand-worked cases of VLMEvalKit's documented
behaviour, the TSV reader's errors, and the runner end to end (resume, circular, MLflow) on the tiny model."""

import base64
import io
import json
import subprocess
import sys

import mlflow
import pytest
from PIL import Image

from ivl.evaluate import answers, prompts, scoring
from ivl.evaluate.runner import Options, evaluate_file
from ivl.evaluate.tsv import BadRow, Item, read_tsv
from ivl.serve.engine import Delta

ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


# ---- scoring ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two dogs.", "2 dogs"),
        ("the 1,000 people", "1000 people"),
        ("A cat; sat", "cat sat"),
        ("coca-cola", "coca cola"),
        ("Yes!", "yes"),
        ("3.14", "3.14"),
        ("I dont know", "i don't know"),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert scoring.normalise_vqa(raw) == normalised


def test_vqa_soft_accuracy_over_ten_references():
    refs = ["cat"] * 3 + ["dog"] * 7
    assert scoring.vqa_score("cat", refs) == pytest.approx(0.9)  # 3 x 2/3 and 7 x 1, over 10
    assert scoring.vqa_score("Dog.", refs) == 1.0
    assert scoring.vqa_score("bird", refs) == 0.0


def test_anls():
    assert scoring.anls("helo", ["hello"]) == pytest.approx(0.8)
    assert scoring.anls("xyz", ["abc"]) == 0.0
    assert scoring.anls("helo", ["hello", "world"]) == pytest.approx(0.8)
    assert scoring.anls("ab", ["abcd"]) == pytest.approx(0.5)  # exactly the threshold counts
    assert scoring.anls("  Hello   World ", ["hello world"]) == 1.0


@pytest.mark.parametrize(
    "target, prediction, right",
    [
        ("50", "52", True),
        ("50", "53", False),
        ("0.5", "50%", True),
        ("50%", "50", False),
        ("0", "0", True),
        ("0", "0.0", False),
        ("1,000", "1000", False),
        ("Yes", "yes", True),
    ],
)
def test_chartqa_relaxed_accuracy(target, prediction, right):
    assert scoring.relaxed_accuracy(prediction, [target]) == float(right)


def test_exact_match():
    assert scoring.exact_match(" Paris ", ["paris"]) == 1.0
    assert scoring.exact_match("Paris.", ["paris"]) == 0.0


# ---- reading answers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, letter",
    [
        ("A", "A"),
        ("A.", "A"),
        ("(A)", "A"),
        ("**B**", "B"),
        ("B) dog", "B"),
        ("Answer: C", "C"),
        ("The answer is A", "A"),
        ("The answer is a dog", "A"),
        ("A and B", None),
        ("dog", "B"),
        ("a dog and a cat", None),
        ("", None),
        ("Z", None),
        ("Option A is correct because the image shows a cat sitting on a mat", None),
    ],
)
def test_reading_a_choice(output, letter):
    assert answers.read_choice(output, ANIMALS) == letter


def test_reading_a_choice_edge_cases():
    assert answers.read_choice("The image shows A cat", {"A": "cat", "B": "dog"}) == "A"
    assert answers.read_choice("C", {"A": "yes", "B": "no"}) is None


# ---- prompts -------------------------------------------------------------------------------------------------


def test_circular_rotations_move_labels_as_vlmevalkit():
    assert prompts.rotate(ANIMALS, 1) == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    assert prompts.rotate(ANIMALS, 2) == {"A": "bird", "B": "fish", "C": "cat", "D": "dog"}
    assert prompts.rotate(ANIMALS, 3) == {"A": "fish", "B": "cat", "C": "dog", "D": "bird"}


def test_prompt_texts():
    mcq = Item("1", "What animal?", ["B"], options={"A": "cat", "B": "dog"})
    assert prompts.text(mcq, "mcq") == (
        "Question: What animal?\nOptions:\nA. cat\nB. dog\nPlease select the correct answer from the options above. \n"
    )
    hinted = Item("1", "What animal?", ["B"], hint="Look closely.", options={"A": "cat", "B": "dog"})
    assert prompts.text(hinted, "mcq").startswith("Hint: Look closely.\nQuestion: What animal?\n")
    vqa = Item("2", "What is written?", ["stop"])
    assert prompts.text(vqa, "vqa") == "What is written?\nAnswer the question using a single word or phrase."
    assert prompts.text(vqa, "plain") == "What is written?"


# ---- TSV files -------------------------------------------------------------------------------------------------


def b64_png(color=(255, 0, 0), size=(28, 28)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows, columns):
    lines = ["\t".join(columns)] + ["\t".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


MCQ_COLUMNS = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]


def mcq_rows():
    red = b64_png((255, 0, 0))
    return [
        {
            "index": 1,
            "image": red,
            "question": "Which colour?",
            "A": "red",
            "B": "blue",
            "C": "green",
            "answer": "A",
            "category": "colour",
        },
        {
            "index": 2,
            "image": "1",
            "question": "Is it red?",
            "A": "yes",
            "B": "no",
            "answer": "A",
            "category": "colour",
        },  # the image of row 1, as VLMEvalKit stores repeated images
        {
            "index": 3,
            "image": b64_png((0, 0, 255)),
            "question": "Which colour?",
            "hint": "A primary colour.",
            "A": "red",
            "B": "blue",
            "answer": "B",
            "category": "hue",
        },
    ]


def test_reading_a_vlmevalkit_tsv(tmp_path):
    items, skipped = read_tsv(write_tsv(tmp_path / "b.tsv", mcq_rows(), MCQ_COLUMNS))
    assert not skipped and [i.index for i in items] == ["1", "2", "3"]
    assert items[1].images[0].getpixel((0, 0)) == (255, 0, 0)
    assert items[0].options == {"A": "red", "B": "blue", "C": "green"} and items[1].options == {"A": "yes", "B": "no"}
    assert items[2].hint == "A primary colour."
    vqa = write_tsv(
        tmp_path / "v.tsv",
        [{"index": 7, "image": b64_png(), "question": "q", "answer": "['cat', 'cat', 'dog']"}],
        ["index", "image", "question", "answer"],
    )
    assert read_tsv(vqa)[0][0].answers == ["cat", "cat", "dog"]


def test_bad_tsvs_name_file_row_and_column(tmp_path):
    with pytest.raises(BadRow, match=r"missing column\(s\) \['question'\]"):
        read_tsv(write_tsv(tmp_path / "a.tsv", [{"index": 1, "answer": "a"}], ["index", "answer"]))
    rows = mcq_rows()
    rows[2]["image"] = "!?" * 50
    with pytest.raises(BadRow, match=r"b.tsv, line 4 \(index 3\), column image: not base64"):
        read_tsv(write_tsv(tmp_path / "b.tsv", rows, MCQ_COLUMNS))
    rows[2]["image"] = "AAAA" * 25  # base64, but of no image
    with pytest.raises(BadRow, match=r"line 4 \(index 3\), column image: not a readable image"):
        read_tsv(write_tsv(tmp_path / "b.tsv", rows, MCQ_COLUMNS))
    rows = mcq_rows()
    rows[0]["answer"] = "D"
    with pytest.raises(BadRow, match=r"line 2 \(index 1\), column answer: 'D' is not one of its options"):
        read_tsv(write_tsv(tmp_path / "c.tsv", rows, MCQ_COLUMNS))
    items, skipped = read_tsv(write_tsv(tmp_path / "c.tsv", rows, MCQ_COLUMNS), skip_bad=True)
    assert len(items) == 2 and len(skipped) == 1 and "index 1" in skipped[0]
    video = write_tsv(
        tmp_path / "d.tsv",
        [{"index": 1, "video": "clip.mp4", "question": "q", "answer": "a"}],
        ["index", "video", "question", "answer"],
    )
    with pytest.raises(BadRow, match="column video: no file"):
        read_tsv(video, media_root=tmp_path)


# ---- the runner ------------------------------------------------------------------------------------------------


class ScriptedEngine:
    """Stands in for the model: answers each prompt by a rule over its text, and counts what it was asked."""

    def __init__(self, rule):
        from ivl.data.processing import Processor

        self.processor, self.rule, self.asked = Processor.from_pretrained(), rule, []

    def generate(self, batch):
        self.asked.extend(p.text for p in batch)
        yield [Delta(self.rule(p.text), "stop") for p in batch]


def test_runner_scores_resumes_and_evaluates_circularly(tmp_path):
    tsv = write_tsv(tmp_path / "mini.tsv", mcq_rows(), MCQ_COLUMNS)
    # right on the original option order only: "red" is always at A there, "blue" at B for row 3
    truth = {
        "Which colour?\nOptions:\nA. red\nB. blue\nC. green": "A",
        "Is it red?\nOptions:\nA. yes\nB. no": "A",
        "Which colour?\nOptions:\nA. red\nB. blue\nPlease": "B",
    }
    engine = ScriptedEngine(lambda text: next((v for k, v in truth.items() if k in text), "I am not sure"))
    scores = evaluate_file(engine, tsv, tmp_path / "out", Options(batch_size=2))
    assert scores["metric"] == "mcq" and scores["score"] == 1.0 and scores["items"] == 3
    assert scores["categories"] == {"colour": 1.0, "hue": 1.0}
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["extracted"] for line in lines] == ["A", "A", "B"]
    # a killed run: keep one prediction; the rerun asks only for the other two
    (tmp_path / "out" / "predictions.jsonl").write_text(lines[0] + "\n")
    engine.asked.clear()
    assert evaluate_file(engine, tsv, tmp_path / "out", Options())["score"] == 1.0
    assert len(engine.asked) == 2
    # circular: the rotated copies are answered from the scripted (original-order) answers, so they fail
    circular = evaluate_file(engine, tsv, tmp_path / "circ", Options(circular=True))
    assert circular["circular"] and circular["score"] == 0.0
    assert len((tmp_path / "circ" / "predictions.jsonl").read_text().splitlines()) == 3 + 2 + 2
    unreadable = evaluate_file(ScriptedEngine(lambda t: "Unsure."), tsv, tmp_path / "none", Options())
    assert unreadable["score"] == 0.0 and unreadable["unreadable"] == 3


def test_cli_on_the_tiny_model_writes_scores_and_logs_to_mlflow(tmp_path):
    from ivl.serve.loading import tiny_random_model

    tiny_random_model().save_pretrained(tmp_path / "model")
    tsv = write_tsv(tmp_path / "mini.tsv", mcq_rows(), MCQ_COLUMNS)
    vqa = write_tsv(
        tmp_path / "words.tsv",
        [{"index": 1, "image": b64_png(), "question": "Colour?", "answer": "['red', 'red', 'crimson']"}],
        ["index", "image", "question", "answer"],
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ivl.evaluate",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tsv),
            str(vqa),
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "eval"),
            "--mlflow",
            uri,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| mini | auto | mcq |" in done.stdout and "| words | auto | vqa |" in done.stdout
    scores = json.loads((tmp_path / "eval" / "mini" / "scores.json").read_text())
    assert scores["items"] == 3 and 0.0 <= scores["score"] <= 1.0
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["ivl-eval"], output_format="list")[0]
    assert run.data.metrics["eval/mini/score"] == pytest.approx(scores["score"])
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "ivl.evaluate",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tmp_path / "nope.tsv"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "nope.tsv: no such file" in missing.stderr


def test_video_benchmarks_sweep_frame_counts_and_plot(tmp_path):
    import random

    from ivl.data.demo import _clip
    from ivl.data.processing import Processor
    from ivl.evaluate.plots import score_against_frames
    from ivl.serve.engine import ChatEngine
    from ivl.serve.loading import tiny_random_model

    for i in range(2):
        _clip(tmp_path / f"clip{i}.mp4", ["red", "blue", "green"][: 2 + i], random.Random(i))
    tsv = write_tsv(
        tmp_path / "clips.tsv",
        [
            {"index": i, "video": f"clip{i}.mp4", "question": "How many squares?", "answer": ["two", "three"][i]}
            for i in range(2)
        ],
        ["index", "video", "question", "answer"],
    )
    small = Processor(Processor.from_pretrained().tokenizer, video_min_pixels=56 * 56, video_max_pixels=56 * 56)
    engine = ChatEngine(tiny_random_model(), small)
    seen = []
    generate = engine.generate
    engine.generate = lambda prompts: (seen.append([len(v) for p in prompts for v in p.videos]), generate(prompts))[1]
    results = [
        evaluate_file(engine, tsv, tmp_path / f"{n}", Options(frames=n, media_root=tmp_path, max_new_tokens=2))
        for n in (4, 6)
    ]
    assert seen == [[4, 4], [6, 6]]  # frames sampled per video, as asked
    assert [r["frames"] for r in results] == [4, 6] and all(r["items"] == 2 for r in results)
    assert score_against_frames(results, tmp_path / "frames.png").stat().st_size > 1000


def test_lmms_eval_adapter_generates_what_the_model_generates(tmp_path):
    """The lmms-eval model: one generate_until call on the tiny model, against model.generate on the same chat."""
    pytest.importorskip("lmms_eval.api.model")
    from lmms_eval.api.instance import Instance

    from ivl.data.processing import Processor
    from ivl.evaluate.lmms import InfiniteVLLMM, manifest
    from ivl.serve.loading import tiny_random_model

    tiny_random_model().save_pretrained(tmp_path / "model")
    lm = InfiniteVLLMM(pretrained=str(tmp_path / "model"), device="cpu", batch_size="2", max_new_tokens=5)
    image = Image.new("RGB", (56, 56), (10, 200, 30))
    lm.task_dict = {"colours": {"test": [{"image": image}, {"image": image}]}}
    requests = [
        Instance(
            "generate_until",
            (
                f"<image>\nWhat colour? ({i})",
                {"max_new_tokens": 5, "until": ["\n\n"]},
                lambda doc: [doc["image"]],
                i,
                "colours",
                "test",
            ),
            i,
            {"task": "colours", "doc_id": i, "repeats": 1},
        )
        for i in range(2)
    ]
    outputs = lm.generate_until(requests)
    processor = Processor.from_pretrained(tmp_path / "model")
    for i, output in enumerate(outputs):
        chat = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What colour? ({i})"}]}],
            add_generation_prompt=True,
        )
        reference = lm.engine.model.generate(**processor(chat, images=[image]), max_new_tokens=5)
        assert output == processor.decode(reference[0])
    assert manifest().simple_class_path == "ivl.evaluate.lmms.InfiniteVLLMM"
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "ivl"]  # how lmms-eval finds it
    assert entry.load() is manifest
    with pytest.raises(NotImplementedError, match="scores by generation"):
        lm.loglikelihood(requests)


def test_the_stage_cli_test_runs_benchmarks_like_python_m_ivl_evaluate(tmp_path):
    """`python -m ivl.experiments test ... --data ivl.evaluate.EvalDataModule`: Trainer.test on a stage scores a
    benchmark exactly as the standalone runner does on the same model, and logs eval/<name>/score."""
    import lightning as L

    from ivl.evaluate import EvalDataModule
    from ivl.serve.engine import ChatEngine
    from ivl.stages import InstructModule

    tsv = write_tsv(tmp_path / "mini.tsv", mcq_rows(), MCQ_COLUMNS)
    module = InstructModule(teacher="tiny", window=64)
    dm = EvalDataModule([str(tsv)], batch_size=2, max_new_tokens=4, circular=True, out=str(tmp_path / "cli"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(module, datamodule=dm)
    alone = evaluate_file(
        ChatEngine(module.model.eval(), dm.processor), tsv, tmp_path / "alone", Options(max_new_tokens=4, circular=True)
    )
    assert metrics["eval/mini/score"] == pytest.approx(alone["score"])
    assert json.loads((tmp_path / "cli" / "mini" / "scores.json").read_text())["categories"] == alone["categories"]
    cli_rows = [json.loads(x) for x in (tmp_path / "cli" / "mini" / "predictions.jsonl").read_text().splitlines()]
    alone_rows = [json.loads(x) for x in (tmp_path / "alone" / "predictions.jsonl").read_text().splitlines()]
    assert cli_rows == alone_rows


def test_test_without_benchmarks_says_what_to_pass(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from ivl.errors import UsageError
    from ivl.stages import InstructModule

    class NotBenchmarks(L.LightningDataModule):
        def test_dataloader(self):
            return DataLoader([{"input_ids": None}], batch_size=None)

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UsageError, match="ivl.evaluate.EvalDataModule"):
        trainer.test(InstructModule(teacher="tiny", window=64), datamodule=NotBenchmarks())


def test_eval_datamodule_shards_questions_over_ranks(tmp_path):
    from types import SimpleNamespace

    from ivl.evaluate import EvalDataModule

    tsv = write_tsv(tmp_path / "mini.tsv", mcq_rows(), MCQ_COLUMNS)
    shares = []
    for rank in range(2):
        dm = EvalDataModule([str(tsv)], batch_size=2, circular=True, out=str(tmp_path / "out"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("test")
        shares.append({(item.index, r) for batch in dm.test_dataloader() for _, item, r in batch})
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == {("1", 0), ("1", 1), ("1", 2), ("2", 0), ("2", 1), ("3", 0), ("3", 1)}


def test_a_killed_cli_evaluation_resumes_from_its_partial_records(tmp_path, monkeypatch):
    import lightning as L

    import ivl.evaluate.datamodule as datamodule
    from ivl.evaluate import EvalDataModule
    from ivl.stages import InstructModule

    tsv = write_tsv(tmp_path / "mini.tsv", mcq_rows(), MCQ_COLUMNS)
    module = InstructModule(teacher="tiny", window=64)

    def run():
        dm = EvalDataModule([str(tsv)], batch_size=2, max_new_tokens=3, out=str(tmp_path / "cli"))
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        return trainer.test(module, datamodule=dm)[0]

    first = run()
    folder = tmp_path / "cli" / "mini"
    rows = folder.joinpath("predictions.jsonl").read_text().splitlines()
    assert not list(folder.glob("partial-*"))  # merged into predictions.jsonl at the end
    folder.joinpath("predictions.jsonl").unlink()
    folder.joinpath("partial-rank0.jsonl").write_text("\n".join(rows[:2]) + "\n")  # killed after two questions
    asked = []
    generate = datamodule.generate
    monkeypatch.setattr(
        datamodule,
        "generate",
        lambda engine, jobs, benchmark, options: (asked.extend(jobs), generate(engine, jobs, benchmark, options))[1],
    )
    assert run() == first and len(asked) == 1
    assert folder.joinpath("predictions.jsonl").read_text().splitlines() == rows


def test_two_cli_processes_score_every_question_once(tmp_path):
    """`test` under DDP on two CPU processes: each rank asks its share, the records are gathered, and the files
    are those of a one-process run (Lightning must not shard the already-sharded batches again)."""
    import os
    from pathlib import Path

    repo = Path(__file__).parents[1]
    tsv = write_tsv(
        tmp_path / "mini.tsv", mcq_rows() + [dict(r, index=r["index"] + 10) for r in mcq_rows()], MCQ_COLUMNS
    )
    from ivl.serve.launch import free_port

    launched = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR")  # this process is no rank of it
    env = {
        **{k: v for k, v in os.environ.items() if k not in launched},
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
    }  # not Lightning's fixed default, which another run may hold
    for devices in (1, 2):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ivl.experiments",
                "test",
                "--config",
                str(repo / "experiments" / "demo.yaml"),
                "--trainer.devices",
                str(devices),
                "--trainer.strategy",
                "ddp" if devices > 1 else "auto",
                "--data",
                "ivl.evaluate.EvalDataModule",
                "--data.benchmarks",
                f"[{tsv}]",
                "--data.batch_size",
                "2",
                "--data.max_new_tokens",
                "3",
                "--data.out",
                str(tmp_path / f"out{devices}"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (tmp_path / f"out{d}" / "mini" / "predictions.jsonl" for d in (1, 2))
    assert len(one.read_text().splitlines()) == 6 and two.read_text() == one.read_text()
