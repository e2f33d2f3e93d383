"""The three stages on tiny models: losses fall, the right parameters train, adapters reload, runs resume."""

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from media_files import write_image
from references import assert_as_accurate, doubled, float64
from torch.utils.data import DataLoader

from ivl.data import ImageDataModule
from ivl.model import InfiniteVL
from ivl.stages import DistillModule, InstructModule, LongContextModule

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def corpus(folder, n=6):
    records = []
    for i in range(n):
        color = list(COLORS)[i % 3]
        write_image(folder / f"{color}.png", COLORS[color])
        records.append(
            {
                "image": f"{color}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": color},
                ],
            }
        )
    path = folder / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def datamodule(path, packed=True, **kwargs):
    return ImageDataModule(
        train=[{"path": str(path)}],
        val=[{"path": str(path)}],
        image_max_pixels=56 * 56,
        pack_tokens=1024 if packed else None,
        batch_size=2,
        **kwargs,
    )


def fixed_batch(path, packed=True):
    dm = datamodule(path, packed)
    return next(iter(dm.train_dataloader()))


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def built(module):
    """The stage with its student built (Lightning builds it in fit; tests that look first build it here)."""
    module.configure_model()
    return module


def fit_on(module, batch, steps=8):
    losses = Losses()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return losses.losses


def test_instruct_loss_falls(tmp_path):
    module = InstructModule(teacher="tiny", window=64, lr=1e-2, warmup_ratio=0.0)
    losses = fit_on(module, fixed_batch(corpus(tmp_path)), steps=12)
    assert losses[-1] < 0.5 * losses[0]


def test_layerwise_distillation_trains_only_gdn_and_leaves_the_teacher(tmp_path):
    module = built(DistillModule(teacher="tiny", window=64, layerwise_steps=-1, lr=1e-3, warmup_ratio=0.0))
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    batch = fixed_batch(corpus(tmp_path), packed=False)
    loss = module.layerwise_loss(batch)
    loss.backward()
    with_grad = {n for n, p in module.model.named_parameters() if p.grad is not None}
    gdn = {n for n in with_grad if n.split(".")[2] in {"1", "2", "3"} and ".mixer." in n}
    assert with_grad and with_grad == gdn  # layers 1-3 are GDN, layer 0 attention
    module.zero_grad()
    losses = fit_on(module, batch)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
    assert not any(k.startswith("teacher") for k in module.state_dict())  # the teacher stays out of checkpoints


def test_end_to_end_distillation_kl_falls(tmp_path):
    module = built(
        DistillModule(teacher="tiny", window=64, layerwise_steps=0, lr=3e-3, warmup_ratio=0.0, trainable=[r"lm\..*"])
    )
    batch = fixed_batch(corpus(tmp_path), packed=False)
    assert module.phase() == "end_to_end"
    losses = fit_on(module, batch)
    assert losses[-1] < 0.5 * losses[0]


def test_phases_switch_after_layerwise_steps(tmp_path):
    module = DistillModule(teacher="tiny", window=64, layerwise_steps=2, warmup_ratio=0.0)
    phases = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            phases.append(pl_module.phase())

    batch = fixed_batch(corpus(tmp_path), packed=False)
    L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    ).fit(module, DataLoader([batch] * 4, batch_size=None))
    assert phases == ["layerwise", "layerwise", "end_to_end", "end_to_end"]


def test_long_context_trains_only_lora_and_exports_merged_weights_and_the_adapter(tmp_path):
    module = built(LongContextModule(teacher="tiny", window=64, lora_r=4, lr=3e-3, warmup_ratio=0.0))
    assert all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    batch = fixed_batch(corpus(tmp_path))
    losses = fit_on(module, batch)
    assert losses[-1] < losses[0]
    inputs = module.model_inputs(batch)
    with torch.no_grad():
        trained = module.model.eval()(**inputs).logits
    module.export(tmp_path / "export")

    merged = InfiniteVL.from_pretrained(tmp_path / "export")  # a plain checkpoint: no LoRA names in it
    with torch.no_grad():
        exact = float64(module.model)(**doubled(inputs)).logits
        assert_as_accurate(merged(**inputs).logits, trained, exact)
    fresh = built(LongContextModule(teacher="tiny", window=64, lora_r=4))  # same seed: the same base weights
    with torch.no_grad():
        assert not torch.allclose(fresh.model.eval()(**inputs).logits, trained)
        fresh.load_adapter(tmp_path / "export" / "adapter")
        torch.testing.assert_close(fresh.model(**inputs).logits, trained, rtol=0, atol=0)


def test_long_context_trains_only_lora_when_trainable_is_passed_as_none():
    """The CLI passes every argument, ``trainable=None`` included: that must still mean the adapters only."""
    module = built(LongContextModule(teacher="tiny", window=64, lora_r=4, trainable=None))
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)


def test_interrupted_fit_resumes_with_the_same_losses(tmp_path):
    path = corpus(tmp_path, n=12)

    class Interrupt(Callback):  # a crash after step 4, with the run configured for 8 (same LR schedule)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                trainer.should_stop = True

    def run(max_steps, folder, ckpt_path=None, interrupt=False):
        losses = Losses()
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[losses, checkpoint] + ([Interrupt()] if interrupt else []),
            limit_val_batches=0,
        )
        torch.manual_seed(0)
        module = InstructModule(teacher="tiny", window=64, lr=3e-3, warmup_ratio=0.0)
        dm = ImageDataModule(train=[{"path": str(path)}], image_max_pixels=56 * 56, pack_tokens=None, batch_size=2)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return losses.losses

    full = run(8, "full")  # 6 batches per epoch: the resume point (step 4) is mid-epoch, the run crosses an epoch
    first = run(8, "interrupted", interrupt=True)
    rest = run(8, "interrupted", ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    assert len(first) == 4 and len(rest) == 4
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=1e-5, atol=1e-6)


def test_checkpoints_carry_the_data_position(tmp_path):
    """Lightning stores the loader's position in the checkpoint (without it a resumed epoch would restart)."""
    path = corpus(tmp_path, n=12)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
        limit_val_batches=0,
    )
    module = InstructModule(teacher="tiny", window=64)
    trainer.fit(
        module,
        datamodule=ImageDataModule(
            train=[{"path": str(path)}], image_max_pixels=56 * 56, pack_tokens=None, batch_size=2
        ),
    )
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"] == [{"epoch": 0, "consumed": 3}]


def test_accuracy_is_exact_match_of_greedy_generation(tmp_path):
    """The teacher-forced accuracy must agree, sample by sample, with generating each answer greedily."""
    torch.manual_seed(0)
    module = InstructModule(teacher="tiny", window=64, lr=1e-2, warmup_ratio=0.0)
    batch = fixed_batch(corpus(tmp_path))
    fit_on(module, batch, steps=6)  # partly trained: some answers right, some wrong
    model = module.model.eval()
    with torch.no_grad():
        correct = module.answer_losses(batch).correct
    cu = batch["cu_seqlens"].tolist()
    patches = batch["image_grid_thw"].prod(-1).tolist()
    for i, (a, z) in enumerate(zip(cu[:-1], cu[1:])):
        ids, labels = batch["input_ids"][0, a:z], batch["labels"][0, a:z]
        start = int((labels != -100).nonzero()[0])
        answer = labels[start:]
        pixels = batch["pixel_values"][sum(patches[:i]) : sum(patches[: i + 1])]
        generated = model.generate(
            input_ids=ids[None, :start],
            pixel_values=pixels,
            image_grid_thw=batch["image_grid_thw"][i : i + 1],
            max_new_tokens=len(answer),
            stop_token_ids=[],
        )
        assert bool(correct[i]) == torch.equal(generated[0], answer)


def test_each_distillation_phase_trains_its_own_parameters_in_one_fit(tmp_path):
    """One fit, two phases, two parameter sets: the optimiser holds both, each step updates only its phase's."""
    module = DistillModule(
        teacher="tiny",
        window=64,
        layerwise_steps=2,
        lr=1e-2,
        warmup_ratio=0.0,
        layerwise_trainable=[r"lm\.layers\.{linear}\.mixer\.q_proj\..*"],
        trainable=[r"lm\.layers\.{linear}\.mlp\..*"],
    )
    snapshots = []

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})

        def on_train_end(self, trainer, pl_module):
            self.on_train_batch_start(trainer, pl_module, None, None)

    batch = fixed_batch(corpus(tmp_path), packed=False)
    L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Snapshot()],
    ).fit(module, DataLoader([batch] * 4, batch_size=None))

    def changed(a, b):
        return {n for n in a if not torch.equal(a[n], b[n])}

    layerwise = {f"lm.layers.{i}.mixer.q_proj.weight" for i in (1, 2, 3)}
    end_to_end = {f"lm.layers.{i}.mlp.{m}.weight" for i in (1, 2, 3) for m in ("gate_proj", "up_proj", "down_proj")}
    assert changed(snapshots[0], snapshots[2]) == layerwise  # steps 1-2
    assert changed(snapshots[2], snapshots[4]) == end_to_end  # steps 3-4


def test_lora_injection_export_loads_back_to_the_same_logits(tmp_path):
    """A LoRAInjection run with save_dir writes a plain checkpoint (adapters merged) that from_pretrained loads."""
    from ivl.callbacks.lora import LoRAInjection

    module = InstructModule(teacher="tiny", window=64, lr=3e-3, warmup_ratio=0.0, save_dir=str(tmp_path / "out"))
    batch = fixed_batch(corpus(tmp_path))
    L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoRAInjection(r=4)],
    ).fit(module, DataLoader([batch] * 3, batch_size=None))
    inputs = module.model_inputs(batch)
    with torch.no_grad():
        trained = module.model.eval()(**inputs).logits
        loaded = InfiniteVL.from_pretrained(tmp_path / "out")(**inputs).logits
        exact = float64(module.model)(**doubled(inputs)).logits
    assert_as_accurate(loaded, trained, exact)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_export_carries_the_pixel_budgets_the_model_was_trained_with(tmp_path):
    """save_dir gets the DataModule's processor settings, not the bundled defaults: served or evaluated, the model
    sees images and videos at the sizes it learned on."""
    from ivl.data import Processor

    dm = datamodule(corpus(tmp_path), video_max_pixels=28 * 28 * 4)
    module = InstructModule(teacher="tiny", window=64, warmup_ratio=0.0, save_dir=str(tmp_path / "out"))
    L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    saved = Processor.from_pretrained(tmp_path / "out")
    assert saved.image_size == {"shortest_edge": dm.processor.image_size["shortest_edge"], "longest_edge": 56 * 56}
    assert saved.video_size["longest_edge"] == 28 * 28 * 4


def test_weight_decay_spares_norms_biases_and_gates(tmp_path):
    """One step at lr ~ 0 with a huge decay: matrices shrink, vectors (norms, biases, A_log, dt_bias) do not."""
    module = built(
        InstructModule(teacher="tiny", window=64, trainable=[".*"], lr=1e-6, weight_decay=1e4, warmup_ratio=0.0)
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit_on(module, fixed_batch(corpus(tmp_path)), steps=1)
    for name, p in module.model.named_parameters():
        if before[name].norm() == 0:  # Gated DeltaNet's mimic init zeroes a_proj and b_proj
            continue
        shrunk = p.detach().norm() < 0.999 * before[name].norm()
        assert shrunk == (p.dim() >= 2), name


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_is_used_unless_lightnings_amp_would_refuse_to_clip_its_gradients(tmp_path, precision):
    """The stages' AdamW is fused on GPUs; under AMP (the science configs' bf16-mixed) with gradient clipping,
    Lightning raises for a fused optimizer, so the stage falls back to foreach there (CPU fused AdamW stands in
    for the GPU's)."""
    module = InstructModule(teacher="tiny", window=64, warmup_ratio=0.0)
    module.adamw_fused = True
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision=precision,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([fixed_batch(corpus(tmp_path))], batch_size=None))
    assert trainer.global_step == 1
    assert trainer.optimizers[0].defaults["fused"] == (precision == "32-true")


def test_distillation_validation_compares_student_and_teacher_on_held_out_answers(tmp_path):
    """val/ppl, val/teacher_ppl, val/top1_agreement (answer tokens) and val/kl_to_teacher (all real tokens),
    token-weighted over two batches, against the full logits of both models' ordinary forwards."""
    import torch.nn.functional as F

    module = built(DistillModule(teacher="tiny", window=64, layerwise_steps=0))
    batches = list(datamodule(corpus(tmp_path, n=4), packed=False).train_dataloader())[:2]
    assert len(batches) == 2
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(module, DataLoader(batches, batch_size=None))[0]

    nll = teacher_nll = agree = kl = answers = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            student = module.model(**module.model_inputs(batch)).logits.double()
            teacher = module.teacher(
                **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
            ).logits.double()
            targets = batch["labels"][:, 1:]
            at = targets != -100
            s, t = student[:, :-1][at], teacher[:, :-1][at]
            nll += F.cross_entropy(s, targets[at], reduction="sum").item()
            teacher_nll += F.cross_entropy(t, targets[at], reduction="sum").item()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            answers += at.sum().item()
            real = batch["attention_mask"].bool()
            kl += F.kl_div(
                student[real].log_softmax(-1), teacher[real].log_softmax(-1), log_target=True, reduction="sum"
            ).item()
            tokens += real.sum().item()
    assert got["val/ppl"] == pytest.approx(math.exp(nll / answers), rel=1e-4)
    assert got["val/teacher_ppl"] == pytest.approx(math.exp(teacher_nll / answers), rel=1e-4)
    assert got["val/top1_agreement"] == pytest.approx(agree / answers, abs=1e-6)
    assert got["val/kl_to_teacher"] == pytest.approx(kl / tokens, rel=1e-3, abs=1e-6)


def test_a_student_with_nothing_to_distil_is_still_validated(tmp_path):
    """All window attention (ratio 1): no Gated DeltaNet layer to train, but `validate` measures it (the baseline
    of the science sweeps); `fit` refuses it."""
    batches = list(datamodule(corpus(tmp_path, n=2), packed=False).train_dataloader())[:1]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(
        DistillModule(teacher="tiny", window=64, hybrid_ratio=1.0), DataLoader(batches, batch_size=None)
    )[0]
    assert {"val/ppl", "val/teacher_ppl", "val/kl_to_teacher", "val/top1_agreement"} <= set(got)
    with pytest.raises(ValueError, match="no linear-mixer layer"):
        trainer.fit(DistillModule(teacher="tiny", window=64, hybrid_ratio=1.0), DataLoader(batches, batch_size=None))


def test_settings_written_with_old_names_still_work():
    """``gdn_init`` and a ``{gdn}`` pattern (the names before ``linear_init`` and ``{linear}``) give what the new
    names give, each with one line naming the new one."""
    new = built(
        InstructModule(
            teacher="tiny", window=64, linear_init="attention", trainable=[r"lm\.layers\.{linear}\.mixer\.q_proj\..*"]
        )
    )
    with pytest.warns(FutureWarning) as record:
        old = built(
            InstructModule(
                teacher="tiny", window=64, gdn_init="attention", trainable=[r"lm\.layers\.{gdn}\.mixer\.q_proj\..*"]
            )
        )
    lines = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert any("'gdn_init' is renamed 'linear_init'" in line for line in lines)
    assert any("'{gdn}' is renamed '{linear}'" in line for line in lines)
    assert old.hparams.linear_init == "attention" and "gdn_init" not in old.hparams
    trains = {n for n, p in new.model.named_parameters() if p.requires_grad}
    assert trains == {n for n, p in old.model.named_parameters() if p.requires_grad} and len(trains) == 3
    assert torch.equal(old.model.lm.layers[1].mixer.k_proj.weight, new.model.lm.layers[1].mixer.k_proj.weight)
