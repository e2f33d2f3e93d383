"""Encoding, packing, resuming and bad input of the DataModules, on real files."""

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from media_files import write_image, write_video
from references import assert_as_accurate, doubled, float64

from ivl.data import BadSample, CorpusSpec, ImageDataModule, Processor, SampleEncoder, VideoDataModule, read_corpus
from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(image_max_pixels=56 * 56, video_max_pixels=56 * 56, video_min_pixels=56 * 56)


def color_corpus(folder, n=12, name="c.jsonl"):
    records = []
    for i in range(n):
        color = list(COLORS)[i % 3]
        write_image(folder / f"{color}.png", COLORS[color])
        records.append(
            {
                "image": f"{color}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nQuestion {i}: what color is it?"},
                    {"from": "gpt", "value": color + "." * (i % 4)},
                ],
            }
        )
    path = folder / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_labels_cover_exactly_the_answers(tmp_path, processor):
    [sample] = read_corpus(CorpusSpec(str(color_corpus(tmp_path, n=1))))
    item = SampleEncoder(processor)(sample)
    answer = processor.tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert answer == "red<|im_end|>"
    assert int((item["input_ids"] == processor.image_token_id).sum()) == item["image_grid_thw"].prod() // 4


@pytest.fixture(scope="module")
def smollm2_processor():
    from transformers import AutoTokenizer

    from ivl.teachers.llama import VISION_TOKENS, smollm2_gguf

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    return Processor(tokenizer)


@pytest.mark.parametrize("which", ["qwen", "smollm2"])
def test_an_answer_that_starts_with_spaces_is_labelled_whole(tmp_path, request, which):
    """SmolLM2's BPE merges the turn header's newline with the answer's leading space into one token ("\\n ")."""
    processor = request.getfixturevalue("processor" if which == "qwen" else "smollm2_processor")
    answer = "    indented code, then text"
    record = {"conversations": [{"from": "human", "value": "Quote it."}, {"from": "gpt", "value": answer}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(record) + "\n")
    [sample] = read_corpus(CorpusSpec(str(tmp_path / "t.jsonl")))
    item = SampleEncoder(processor)(sample)
    labelled = processor.tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert labelled.endswith(answer + "<|im_end|>") and len(labelled) <= len(answer + "<|im_end|>") + 1


def test_video_sample_carries_timestamps(tmp_path, processor):
    write_video(tmp_path / "clip.mp4", [COLORS["red"], COLORS["blue"]], frames_per_color=8, fps=8)  # 2 s
    record = {
        "video": "clip.mp4",
        "conversations": [{"from": "human", "value": "<video>first color?"}, {"from": "gpt", "value": "red"}],
    }
    (tmp_path / "v.jsonl").write_text(json.dumps(record) + "\n")
    [sample] = read_corpus(CorpusSpec(str(tmp_path / "v.jsonl")))
    item = SampleEncoder(processor, video_fps=2.0)(sample)
    assert item["video_grid_thw"].tolist() == [[2, 4, 4]]  # 2 s at 2 fps = 4 frames = 2 temporal patches
    assert item["second_per_grid_ts"].tolist() == [1.0]
    # the first temporal patch is red, the second blue
    first = item["pixel_values_videos"].view(2, 16, 3, -1)[:, 0, :, 0]
    assert first[0, 0] > first[0, 2] and first[1, 2] > first[1, 0]


def test_missing_and_corrupt_images_name_file_line_and_path(tmp_path, processor):
    path = color_corpus(tmp_path, n=3)
    (tmp_path / "green.png").unlink()
    (tmp_path / "blue.png").write_bytes(b"not a png")
    samples = read_corpus(CorpusSpec(str(path)))
    encoder = SampleEncoder(processor)
    with pytest.raises(BadSample, match=rf"c\.jsonl:2: image {tmp_path / 'green.png'} not found"):
        encoder(samples[1])
    with pytest.raises(BadSample, match=rf"c\.jsonl:3: image {tmp_path / 'blue.png'} cannot be decoded"):
        encoder(samples[2])


def test_over_budget_is_an_error_or_a_truncation(tmp_path, processor):
    [sample] = read_corpus(CorpusSpec(str(color_corpus(tmp_path, n=1))))
    n = len(SampleEncoder(processor)(sample)["input_ids"])
    with pytest.raises(BadSample, match=rf"c\.jsonl:1: {n} tokens, over the per-sample budget of {n - 1}"):
        SampleEncoder(processor, max_tokens=n - 1)(sample)
    item = SampleEncoder(processor, max_tokens=n - 1, truncation="truncate")(sample)
    assert len(item["input_ids"]) == n - 1
    first_image_token = int((item["input_ids"] == processor.image_token_id).nonzero()[0])
    with pytest.raises(BadSample, match="would cut through an image"):
        SampleEncoder(processor, max_tokens=first_image_token + 1, truncation="truncate")(sample)


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    path = color_corpus(tmp_path, n=6)
    with path.open("a") as f:
        f.write('{"image": "red.png", "conversations": [\n')
        f.write(
            json.dumps(
                {
                    "image": "gone.png",
                    "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}],
                }
            )
            + "\n"
        )
    dm = ImageDataModule(
        train=[{"path": str(path)}], pack_tokens=None, batch_size=2, skip_bad_samples=True, image_max_pixels=56 * 56
    )
    dm.setup()
    assert len(dm.bad_at_read) == 1 and "c.jsonl:7: malformed JSON line" in dm.bad_at_read[0]
    loader = dm.train_dataloader()
    with caplog.at_level("WARNING"):
        seen = sum(len(b["sources"]) for b in loader)
    assert seen == 6 and len(loader.skipped) == 1 and "gone.png not found" in loader.skipped[0]
    assert "skipped 1 bad sample" in caplog.text
    strict = ImageDataModule(train=[{"path": str(path)}], pack_tokens=None, image_max_pixels=56 * 56)
    with pytest.raises(BadSample, match=r"c\.jsonl:7: malformed JSON line"):
        strict.setup()


def test_packed_batches_respect_the_budget_and_leak_nothing(tmp_path):
    dm = ImageDataModule(train=[{"path": str(color_corpus(tmp_path))}], pack_tokens=120, image_max_pixels=56 * 56)
    batches = list(dm.train_dataloader())
    assert sorted(s for b in batches for s in b["sources"]) == sorted(
        f"{tmp_path / 'c.jsonl'}:{i}" for i in range(1, 13)
    )
    assert all(b["input_ids"].shape[1] <= 120 for b in batches) and any(len(b["sources"]) > 1 for b in batches)
    torch.manual_seed(0)
    model = InfiniteVL(
        InfiniteVLConfig(
            text=HybridConfig.tiny(vocab_size=151936, window=8),
            vision=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                fullatt_block_indexes=[0],
            ),
        )
    ).eval()
    batch = next(b for b in batches if len(b["sources"]) > 1)
    cu = batch["cu_seqlens"].tolist()
    exact_model = float64(model)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            cu_seqlens=batch["cu_seqlens"],
        ).logits
        patches = (batch["image_grid_thw"].prod(-1)).tolist()
        starts = [sum(patches[:i]) for i in range(len(patches))]
        for i, (a, z) in enumerate(zip(cu[:-1], cu[1:])):
            inputs = dict(
                input_ids=batch["input_ids"][:, a:z],
                pixel_values=batch["pixel_values"][starts[i] : starts[i] + patches[i]],
                image_grid_thw=batch["image_grid_thw"][i : i + 1],
            )
            alone = model(**inputs).logits
            assert_as_accurate(packed[:, a:z], alone, exact_model(**doubled(inputs)).logits)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_remaining_batches(tmp_path, workers):
    def module():
        return ImageDataModule(
            train=[{"path": str(color_corpus(tmp_path, n=20))}],
            pack_tokens=None,
            batch_size=3,
            num_workers=workers,
            seed=7,
            image_max_pixels=56 * 56,
        )

    dm = module()
    loader = dm.train_dataloader()
    first_epoch = [b["sources"] for b in loader]
    second_epoch = iter(loader)
    taken = [next(second_epoch)["sources"] for _ in range(3)]
    state = dm.state_dict()
    rest = [b["sources"] for b in second_epoch]
    assert taken + rest != first_epoch  # a new epoch is a new shuffle

    resumed = module()
    resumed.load_state_dict(state)
    assert [b["sources"] for b in resumed.train_dataloader()] == rest


class Record(L.LightningModule):
    """Trains nothing; records (epoch, the batch's sources) of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["sources"]))
        return self.w * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Killed(Exception):
    pass


def fit_killed_and_resumed(datamodule, folder, step: int, epochs: int) -> tuple[Record, Record, Record]:
    """(uninterrupted, killed, resumed) fits of ``epochs`` epochs: killed as step ``step`` starts, resumed from the
    checkpoint ModelCheckpoint wrote after the step before, each with a new ``datamodule()``."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class KillAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise Killed

    def fit(module, callbacks=(), ckpt=None):
        L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
        ).fit(module, datamodule(), ckpt_path=ckpt)
        return module

    whole, killed = fit(Record()), Record()
    with pytest.raises(Killed):
        fit(killed, [ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1), KillAt()])
    return whole, killed, fit(Record(), [ModelCheckpoint(dirpath=folder / "resumed")], str(folder / "last.ckpt"))


def test_every_epoch_of_a_fit_is_a_new_shuffle_of_the_whole_corpus(tmp_path):
    """Lightning's fit loop stops after an epoch's last batch without running the loader's generator to its end;
    each epoch must still draw its own order (it once replayed the first epoch's order every epoch)."""
    dm = ImageDataModule(
        train=[{"path": str(color_corpus(tmp_path, n=12))}],
        pack_tokens=None,
        batch_size=3,
        seed=5,
        image_max_pixels=56 * 56,
    )
    module = Record()
    L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    ).fit(module, dm)
    epochs = [[s for e, batch in module.seen if e == epoch for s in batch] for epoch in range(3)]
    assert all(sorted(order) == sorted(epochs[0]) and len(order) == 12 for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3


def test_packed_epochs_of_different_lengths_each_train_every_sample(tmp_path):
    """Each epoch packs a new shuffle, so epochs differ in their number of packs; Lightning sizes an epoch when it
    loads the loader, so an epoch longer than the first once lost its last packs. Killed in the longest epoch, a
    fit resumes with exactly the packs it had not trained."""
    from ivl.data import VLDataModule

    records = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}?"},
                {"from": "gpt", "value": " ".join(["word"] * (3 + (i * 7) % 40))},
            ]
        }
        for i in range(24)
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    def datamodule():
        return VLDataModule(train=[{"path": str(tmp_path / "c.jsonl")}], pack_tokens=100, seed=1)

    lengths = [len(datamodule().train_dataloader().plan(epoch)) for epoch in range(4)]
    assert lengths[0] < lengths[3] == max(lengths)  # a later epoch has more packs than the first (15, 16, 16, 17)
    whole, killed, resumed = fit_killed_and_resumed(datamodule, tmp_path / "ckpt", sum(lengths[:3]) + 5, epochs=4)
    for epoch in range(4):
        sources = [s for e, batch in whole.seen if e == epoch for s in batch]
        assert sorted(sources) == sorted(set(sources)) and len(sources) == 24, epoch
    assert killed.seen + resumed.seen == whole.seen


def test_a_fit_saved_at_an_epoch_end_resumes_with_the_whole_next_epoch(tmp_path):
    """A checkpoint written after an epoch's last batch holds (that epoch, every batch consumed); resuming from it
    must train the next epoch whole, in the order the uninterrupted fit trains it."""
    path = color_corpus(tmp_path, n=12)

    def datamodule():
        return ImageDataModule(
            train=[{"path": str(path)}], pack_tokens=None, batch_size=3, seed=5, image_max_pixels=56 * 56
        )

    whole, killed, resumed = fit_killed_and_resumed(datamodule, tmp_path / "ckpt", 4, epochs=2)  # 4 batches an epoch
    assert killed.seen == whole.seen[:4]
    assert resumed.seen == whole.seen[4:] and len(resumed.seen) == 4


def test_validation_starts_from_its_first_batch_after_a_resume(tmp_path):
    """Only the training position is saved: a checkpoint taken after some validation batches (Lightning's sanity
    check runs two) must not make the resumed run's first validation skip them."""
    path = color_corpus(tmp_path, n=12)

    def module():
        return ImageDataModule(
            train=[{"path": str(path)}],
            val=[{"path": str(path)}],
            pack_tokens=None,
            batch_size=3,
            image_max_pixels=56 * 56,
        )

    dm = module()
    batches = iter(dm.val_dataloader())
    next(batches), next(batches)
    state = dm.state_dict()
    assert set(state) == {"train"}
    resumed = module()
    resumed.load_state_dict({**state, "val": {"epoch": 0, "consumed": 2}})  # as older checkpoints hold it
    assert len(list(resumed.val_dataloader())) == 4


def test_the_shuffle_follows_seed_everything_unless_a_seed_is_given(tmp_path, monkeypatch):
    """A sweep's seeds set ``seed_everything``; they must change the data order too, not only the initialisation."""
    from lightning.fabric.utilities.seed import seed_everything

    path = color_corpus(tmp_path, n=12)

    def plan(**kwargs):
        dm = ImageDataModule(
            train=[{"path": str(path)}], pack_tokens=None, batch_size=3, image_max_pixels=56 * 56, **kwargs
        )
        return dm.train_dataloader().plan(0)

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    unseeded = plan()
    seed_everything(0)
    assert plan() == unseeded  # no seed anywhere: seed 0
    seed_everything(1)
    first = plan()
    seed_everything(2)
    assert plan() != first
    assert plan(seed=1) == first  # an explicit seed wins


def test_mixture_follows_weights(tmp_path):
    a = color_corpus(tmp_path / "a", n=10)
    b = color_corpus(tmp_path / "b", n=10)
    dm = ImageDataModule(
        train=[{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
        pack_tokens=None,
        batch_size=4,
        samples_per_epoch=40,
        image_max_pixels=56 * 56,
    )
    dm.setup()
    plan = dm.train_dataloader().plan(0)
    indices = [i for batch in plan for i in batch]
    assert len(indices) == 40 and sum(i < 10 for i in indices) == 30


def test_video_datamodule_batches(tmp_path):
    for i, (first, second) in enumerate([("red", "blue"), ("blue", "green")]):
        write_video(tmp_path / f"v{i}.mp4", [COLORS[first], COLORS[second]], frames_per_color=4, fps=4)
    records = [
        {
            "video": f"v{i}.mp4",
            "conversations": [{"from": "human", "value": "<video>Which color first?"}, {"from": "gpt", "value": c}],
        }
        for i, c in enumerate(["red", "blue"])
    ]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    dm = VideoDataModule(train=[{"path": str(tmp_path / "v.jsonl")}], pack_tokens=512, video_max_pixels=56 * 56)
    [batch] = list(dm.train_dataloader())
    assert batch["video_grid_thw"].shape == (2, 3) and batch["cu_seqlens"].tolist()[0] == 0
    assert batch["second_per_grid_ts"].shape == (2,)


def test_ranks_split_the_epoch_and_resume_on_another_number_of_processes(tmp_path):
    """Each of two ranks gets its own half of the epoch's batches (together: all of them, no overlap); a position
    saved by two ranks resumes on one process with exactly the batches the two had not reached."""
    path = color_corpus(tmp_path, n=12)

    def loader(rank, world):
        dm = ImageDataModule(train=[{"path": str(path)}], image_max_pixels=56 * 56, pack_tokens=None, batch_size=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)  # what Lightning attaches
        return dm, dm.train_dataloader()

    def key(batch):
        return tuple(batch["input_ids"][0].tolist())  # every sample's question is different

    single = [key(b) for b in loader(0, 1)[1]]
    halves = [[key(b) for b in loader(rank, 2)[1]] for rank in (0, 1)]
    assert len(single) == 12 and len(halves[0]) == len(halves[1]) == 6
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(single)

    states = []
    for rank in (0, 1):  # both ranks stop after two batches each
        dm, shard = loader(rank, 2)
        batches = iter(shard)
        next(batches), next(batches)
        states.append(dm.state_dict())
    assert states[0] == states[1] == {"train": {"epoch": 0, "consumed": 4}}
    dm, resumed = loader(0, 1)
    dm.load_state_dict(states[0])
    assert [key(b) for b in resumed] == single[4:]
