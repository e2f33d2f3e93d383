"""LayerFreezing and LoRAInjection on a real stage and Trainer."""

import lightning as L
import torch
from test_stages import built, corpus, fixed_batch
from torch.utils.data import DataLoader

from ivl.callbacks.freezing import LayerFreezing
from ivl.callbacks.lora import LoRAInjection
from ivl.stages import InstructModule


def trainer(callbacks, steps):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def test_layer_freezing_freezes_then_unfreezes_on_schedule(tmp_path):
    module = built(InstructModule(teacher="tiny", window=64, trainable=[".*"]))
    vision_before = {n: p.clone() for n, p in module.model.visual.named_parameters()}
    freezing = LayerFreezing(
        patterns=[r"model\.visual"], module_types=["SlidingWindowAttention"], unfreeze_at_epoch={1: [r"model\.visual"]}
    )
    batch = fixed_batch(corpus(tmp_path))
    trainer([freezing], steps=2).fit(module, DataLoader([batch] * 2, batch_size=None))  # epoch 0 only
    assert all(torch.equal(p, vision_before[n]) for n, p in module.model.visual.named_parameters())
    assert not module.model.lm.layers[0].mixer.q_proj.weight.requires_grad  # attention layers by type
    assert module.model.lm.layers[1].mixer.q_proj.weight.requires_grad

    module = InstructModule(teacher="tiny", window=64, trainable=[".*"])  # built by fit, frozen once built
    freezing = LayerFreezing(patterns=[r"model\.visual"], unfreeze_at_epoch={1: [r"model\.visual"]})
    trainer([freezing], steps=4).fit(module, DataLoader([batch] * 2, batch_size=None))  # epochs 0 and 1
    assert any(not torch.equal(p, vision_before[n]) for n, p in module.model.visual.named_parameters())
    # what the schedule unfreezes is known when the student is built: under FSDP2 it stays float32
    assert {id(p) for p in module.thawed_later} == {id(p) for p in module.model.visual.parameters()}


def test_lora_injection_trains_only_adapters(tmp_path):
    base = {n: p.clone() for n, p in built(InstructModule(teacher="tiny", window=64)).model.named_parameters()}
    module = InstructModule(teacher="tiny", window=64, trainable=[".*"])  # same seed: the same weights
    batch = fixed_batch(corpus(tmp_path))
    trainer([LoRAInjection(r=4, target_modules=["q_proj", "v_proj"])], steps=3).fit(
        module, DataLoader([batch] * 3, batch_size=None)
    )
    names = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    changed = {n for n, p in module.model.named_parameters() if "lora_" in n and "lora_B" in n and p.abs().sum() > 0}
    assert changed  # lora_B starts at zero: a non-zero one was trained
    for n, p in module.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


def test_run_duration_prints_the_expected_time_from_measured_batches(tmp_path, caplog):
    import logging

    from ivl.callbacks.duration import RunDuration

    module = InstructModule(teacher="tiny", window=64)
    batch = fixed_batch(corpus(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer([RunDuration(after_batches=2)], steps=5).fit(module, DataLoader([batch] * 5, batch_size=None))
    [estimate] = [r.getMessage() for r in caplog.records if "min of training left" in r.getMessage()]
    assert "(5 batches in all" in estimate
    assert any("training took" in r.getMessage() for r in caplog.records)


def test_a_stage_fit_stops_at_its_first_logged_non_finite_loss(tmp_path):
    """Every stage carries FiniteLoss: a learning rate that makes the weights infinite stops the fit with an error
    naming the step (instead of 600 more steps logged as zeros), checked at the logging steps."""
    import pytest

    module = InstructModule(teacher="tiny", window=64, trainable=[".*"], lr=1e30, warmup_ratio=0.0)
    batch = fixed_batch(corpus(tmp_path))
    fit = L.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=4,
    )
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf) at step (4|8|12|16)\b"):
        fit.fit(module, DataLoader([batch] * 20, batch_size=None))
    assert fit.global_step < 20
    assert not all(torch.isfinite(p).all() for p in module.model.parameters())


def test_progress_prints_plain_lines_when_the_output_is_not_a_terminal(tmp_path, capsys):
    """Under pytest the output is captured, as in a log file: one line every few steps with the loss and the
    tokens/s of the batches since the last line, and one after validation."""
    from ivl.callbacks.progress import ProgressBar

    module = InstructModule(teacher="tiny", window=64)
    batch = fixed_batch(corpus(tmp_path))
    fit = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        val_check_interval=3,
        num_sanity_val_steps=0,
        callbacks=[ProgressBar(every_n_steps=2, every_seconds=3600)],
    )
    fit.fit(module, DataLoader([batch] * 6, batch_size=None), DataLoader([batch], batch_size=None))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ivl: ")]
    train = [line for line in lines if "| step " in line]
    assert [line.split(" | ")[1] for line in train] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("train/loss " in line and " tokens/s | " in line for line in train), train
    assert float(train[0].split(" tokens/s")[0].split(" | ")[-1].replace(",", "")) > 0
    assert sum(line.startswith("ivl: validation at step 3 | val/loss ") for line in lines) == 1, lines
