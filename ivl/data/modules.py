"""LightningDataModules for image, document and video corpora: read -> validate -> encode -> pack -> batches.

Batches are planned in the main process as lists of sample indices (shuffled per epoch from the seed, mixed by
corpus weight, packed to a token budget), and built in worker processes. The loader counts the batches it has
handed out, so a checkpoint taken mid-epoch resumes with exactly the remaining batches (Lightning saves and
restores any loader with ``state_dict``/``load_state_dict``).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ivl.data.corpus import BadSample, CorpusSpec, Sample, check_corpus, corpus_files, read_corpus
from ivl.data.encoding import SampleEncoder
from ivl.data.lengths import cached_lengths
from ivl.data.packing import collate_packed, collate_padded, plan_packs
from ivl.data.processing import Processor

log = logging.getLogger(__name__)


class EncodedDataset(Dataset):
    """Samples encoded on access (in worker processes); bad ones come back as {"bad": message} when skipping."""

    def __init__(self, samples: list[Sample], encoder: SampleEncoder, skip_bad_samples: bool):
        self.samples, self.encoder, self.skip_bad_samples = samples, encoder, skip_bad_samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        try:
            return self.encoder(self.samples[i])
        except BadSample as err:
            if not self.skip_bad_samples:
                raise
            return {"bad": str(err)}


def _collate(items: list[dict], packed: bool, pad_token_id: int) -> dict:
    good = [item for item in items if "bad" not in item]
    bad = [item["bad"] for item in items if "bad" in item]
    batch = (collate_packed(good) if packed else collate_padded(good, pad_token_id)) if good else {}
    batch["skipped"] = bad
    return batch


class ResumableLoader(DataLoader):
    """A DataLoader over a precomputed, per-epoch batch plan that remembers how many batches it handed out.

    With several processes each one iterates its own share of the plan (``plan(epoch)`` already holds only this
    rank's batches, every ``world``-th one); the saved position counts batches of the whole plan, so a run
    resumes at the same place on any number of processes.
    """

    def __init__(self, dataset, plan, collate_fn, num_workers: int, name: str, world=lambda: 1):
        self.plan, self.name, self.world = plan, name, world  # plan(epoch) -> this rank's index lists
        self.epoch, self.consumed, self._resume, self._skip = 0, 0, None, 0
        self.skipped: list[str] = []
        # Pinned batches reach the GPU by queued copies; from pageable memory the host would wait for the GPU.
        super().__init__(dataset, batch_sampler=_PlanSampler(self), collate_fn=collate_fn, num_workers=num_workers,
                         persistent_workers=False, pin_memory=torch.cuda.is_available())

    def _start(self) -> tuple[int, int]:
        """(epoch, batches to skip) of the next iteration: the restored position, else this epoch from its start."""
        if self._resume is None:
            return self.epoch, 0
        epoch, skip = self._resume
        if skip >= len(self.plan(epoch)):  # saved after the epoch's last batch: the next epoch, whole
            return epoch + 1, 0
        return epoch, skip

    def __iter__(self):
        self.epoch, skip = self._start()
        self._resume = None
        self.consumed = skip
        self._skip = skip
        self.skipped = []
        for batch in super().__iter__():
            self.consumed += 1
            self.skipped += batch.get("skipped", [])
            if "input_ids" not in batch:  # every sample of this batch was bad and skipped
                continue
            yield batch
        if self.skipped:
            log.warning("%s epoch %d: skipped %d bad sample(s); first: %s", self.name, self.epoch,
                        len(self.skipped), self.skipped[0])
        self.epoch += 1
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.plan(self._start()[0]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed * self.world()}

    def load_state_dict(self, state: dict) -> None:
        world, consumed = self.world(), int(state["consumed"])
        if consumed % world:
            log.warning("%s: the checkpoint stopped after %d batches, not a multiple of %d processes; resuming "
                        "after %d", self.name, consumed, world, consumed - consumed % world)
        self._resume = (int(state["epoch"]), consumed // world)


class _PlanSampler:
    """The loader's batch sampler: this rank's batches of the loader's epoch, from the resume point on.

    Lightning's fit loop never runs the loader's generator past the epoch's last batch, so the loader cannot count
    epochs itself; instead, at the start of every epoch Lightning calls ``set_epoch`` on ``batch_sampler.sampler``
    (as for a DistributedSampler), which is this object.
    """

    def __init__(self, loader: ResumableLoader):
        self.loader = loader
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        if self.loader._resume is None:  # a restored position names its own epoch
            self.loader.epoch = epoch

    def __iter__(self):
        yield from self.loader.plan(self.loader.epoch)[self.loader._skip:]

    def __len__(self) -> int:
        return len(self.loader.plan(self.loader.epoch)) - getattr(self.loader, "_skip", 0)


class VLDataModule(L.LightningDataModule):
    """Vision-language corpora -> packed (or padded) training batches.

    Args:
        train, val: corpora (``CorpusSpec`` or dicts with path, media_root, weight), mixed by weight.
        processor: a folder with tokenizer files (the teacher's or a checkpoint's); None: bundled Qwen2.5.
        max_tokens: per-sample token budget; ``truncation`` "error" or "truncate" beyond it.
        pack_tokens: pack samples into rows of at most this many tokens (varlen); None: ``batch_size`` padded rows.
        samples_per_epoch: size of the weighted mixture per epoch (default: every sample once).
        seed: the shuffle's seed; None: the run's ``seed_everything`` (Lightning's ``PL_GLOBAL_SEED``), else 0, so
            that the seeds of a sweep also change the data order.
        skip_bad_samples: skip (and count, and log) unusable samples instead of stopping with their error.
        image_min_pixels / image_max_pixels, video_max_pixels, video_fps, video_max_frames: vision budgets.
        missing_hint: how to get the corpus files, appended to the error when one is missing.
    """

    def __init__(
        self,
        train: list[CorpusSpec | dict],
        val: list[CorpusSpec | dict] | None = None,
        processor: str | None = None,
        max_tokens: int = 8192,
        truncation: str = "error",
        pack_tokens: int | None = 8192,
        batch_size: int = 1,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        skip_bad_samples: bool = False,
        image_min_pixels: int = 56 * 56,
        image_max_pixels: int = 28 * 28 * 1280,
        video_max_pixels: int = 768 * 28 * 28,
        video_fps: float = 2.0,
        video_max_frames: int = 64,
        missing_hint: str | None = None,
    ):
        super().__init__()
        self.train_specs = [CorpusSpec(**c) if isinstance(c, dict) else c for c in train]
        self.val_specs = [CorpusSpec(**c) if isinstance(c, dict) else c for c in (val or [])]
        check_corpora(self.train_specs, self.val_specs, missing_hint)
        self.save_hyperparameters({"train": [asdict(c) for c in self.train_specs],
                                   "val": [asdict(c) for c in self.val_specs]})
        self.processor_dir = processor
        self.max_tokens, self.truncation = max_tokens, truncation
        self.pack_tokens, self.batch_size = pack_tokens, batch_size
        self.samples_per_epoch, self.num_workers, self.seed = samples_per_epoch, num_workers, seed
        self.skip_bad_samples = skip_bad_samples
        self.pixels = dict(image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels,
                           video_max_pixels=video_max_pixels, video_min_pixels=min(128 * 28 * 28, video_max_pixels))
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.bad_at_read: list[str] = []
        self._loaders: dict[str, ResumableLoader] = {}

    @functools.cached_property
    def processor(self) -> Processor:
        return Processor.from_pretrained(self.processor_dir, **self.pixels)

    def setup(self, stage: str | None = None) -> None:
        if self._loaders:
            return
        encoder = SampleEncoder(self.processor, self.max_tokens, self.truncation, self.video_fps,
                                self.video_max_frames)
        for split, specs in (("train", self.train_specs), ("val", self.val_specs)):
            if not specs:
                continue
            corpora = [read_corpus(s, self.skip_bad_samples, self.bad_at_read) for s in specs]
            if self.bad_at_read:
                log.warning("skipped %d bad record(s) while reading; first: %s", len(self.bad_at_read),
                            self.bad_at_read[0])
            offsets = [sum(len(c) for c in corpora[:i]) for i in range(len(corpora))]
            dataset = EncodedDataset([s for c in corpora for s in c], encoder, self.skip_bad_samples)
            weights = [s.weight for s in specs]
            lengths = self._lengths(dataset, split, specs) if self.pack_tokens else None
            shard_plan = functools.lru_cache(maxsize=4)(functools.partial(
                self._plan, corpora=[len(c) for c in corpora], offsets=offsets, weights=weights, lengths=lengths,
                shuffle=split == "train"))

            def plan(epoch: int, shard_plan=shard_plan) -> list[list[int]]:
                return shard_plan(epoch, *self._ranks())

            collate = functools.partial(_collate, packed=self.pack_tokens is not None,
                                        pad_token_id=self.processor.tokenizer.pad_token_id)
            self._loaders[split] = ResumableLoader(dataset, plan, collate, self.num_workers, split,
                                                   world=lambda: self._ranks()[1])

    def _lengths(self, dataset: EncodedDataset, split: str, specs: list[CorpusSpec]) -> list[int]:
        """Token count of every sample, needed to plan packs: from text and media headers (no pixel decoding),
        cached next to the corpus (``ivl.data.lengths``)."""
        files = [f for spec in specs for f in corpus_files(spec)]
        return cached_lengths(dataset.samples, dataset.encoder, files, {"specs": [asdict(s) for s in specs]},
                              desc=f"counting {split} tokens")

    def _plan(self, epoch: int, rank: int, world: int, corpora, offsets, weights, lengths,
              shuffle) -> list[list[int]]:
        """This rank's batches of the epoch: the whole epoch's plan (the same on every rank), then every
        world-th batch."""
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        rng = random.Random(seed * 1_000_003 + epoch)
        total = self.samples_per_epoch if shuffle and self.samples_per_epoch else sum(corpora)
        order = []
        for n, offset, w in zip(corpora, offsets, weights):
            share = round(total * w / sum(weights)) if shuffle and self.samples_per_epoch else n
            picks = list(range(n)) if not shuffle else _draw(rng, n, share)
            order += [offset + i for i in picks]
        if shuffle:
            rng.shuffle(order)
        if lengths is not None:
            order = [i for i in order if lengths[i] > 0]  # bad samples found while measuring
            batches = plan_packs(lengths, order, self.pack_tokens)
        else:
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # Several processes (DDP/FSDP): each takes every world-th batch, all the same count. Run the Trainer with
        # use_distributed_sampler=False: the plan already shards.
        if world > 1:
            per_rank = len(batches) // world
            batches = batches[rank::world][:per_rank]
        return batches

    def _ranks(self) -> tuple[int, int]:
        """(this process's rank, number of processes) of the Trainer this DataModule is attached to."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> ResumableLoader:
        self.setup("fit")
        loader = self._loaders["train"]
        if self.trainer is not None:
            # Lightning reads len() when it loads the loader, before its own set_epoch: the loader must be at the
            # epoch about to run already.
            loader.batch_sampler.set_epoch(self.trainer.current_epoch)
            if self.pack_tokens is not None and not self.trainer.reload_dataloaders_every_n_epochs:
                # Each epoch packs a new shuffle, so epochs differ in length by a batch or two, and Lightning sizes
                # an epoch by len() when it loads the loader: it must load it again every epoch (the same object,
                # now at that epoch), or a longer epoch loses its last batches.
                self.trainer.reload_dataloaders_every_n_epochs = 1
        return loader

    def val_dataloader(self) -> ResumableLoader | list:
        self.setup("validate")
        return self._loaders.get("val", [])

    # With a DataModule Lightning runs its transfer hooks, not the module's. What a batch needs on the host before
    # the copy depends on the model it feeds (its multimodal positions): the module being trained prepares it.
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        prepare = getattr(self.trainer.lightning_module, "prepare_batch", None) if self.trainer else None
        return batch if prepare is None else prepare(batch)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        arrived = getattr(self.trainer.lightning_module, "batch_arrived", None) if self.trainer else None
        return batch if arrived is None else arrived(batch)

    def state_dict(self) -> dict:
        # the training position only: every validation starts from its first batch
        return {"train": self._loaders["train"].state_dict()} if "train" in self._loaders else {}

    def load_state_dict(self, state: dict) -> None:
        self.setup()
        if "train" in state and "train" in self._loaders:  # older checkpoints also hold "val": not restored
            self._loaders["train"].load_state_dict(state["train"])


def check_corpora(train: list, val: list, hint: str | None = None, prefix: str = "") -> None:
    """A UsageError naming the first missing corpus (``train[i].path`` / ``val[i].path``) and how to get it."""
    for split, specs in (("train", train), ("val", val)):
        for i, spec in enumerate(specs):
            spec = CorpusSpec(**spec) if isinstance(spec, dict) else spec
            check_corpus(spec, f"{prefix}{split}[{i}].path", hint)


def _draw(rng: random.Random, n: int, k: int) -> list[int]:
    """k indices of range(n): a permutation prefix, repeated permutations when k > n."""
    out = []
    while len(out) < k:
        perm = list(range(n))
        rng.shuffle(perm)
        out += perm[: k - len(out)]
    return out


class ImageDataModule(VLDataModule):
    """Natural-image instruction and VQA corpora (defaults: Qwen2.5-VL's image pixel range)."""


class DocumentDataModule(VLDataModule):
    """Documents, charts and multi-page scans: one image per page, high resolution (up to 1344 x 1344)."""

    def __init__(self, *args, image_max_pixels: int = 1344 * 1344, **kwargs):
        super().__init__(*args, image_max_pixels=image_max_pixels, **kwargs)


class VideoDataModule(VLDataModule):
    """Video corpora decoded with PyAV, sampled by fps (or per-sample nframes), at most video_max_frames frames."""

    def __init__(self, *args, video_fps: float = 2.0, video_max_frames: int = 32,
                 video_max_pixels: int = 256 * 28 * 28, **kwargs):
        super().__init__(*args, video_fps=video_fps, video_max_frames=video_max_frames,
                         video_max_pixels=video_max_pixels, **kwargs)
