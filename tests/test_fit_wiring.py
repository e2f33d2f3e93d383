"""Lightning finds ivl's hooks where it looks for them: with a DataModule, the DataModule's batch-transfer hooks run,
and they have the module being trained prepare each batch on the host; the ThroughputMonitor reads the FLOPs of
each batch from the stage module."""

import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback
from test_stages import corpus, datamodule

from ivl.callbacks.throughput import TokenThroughput
from ivl.stages import InstructModule
from ivl.stages.flops import hybrid_batch_flops, sequence_lengths


class Seen(Callback):
    """Each training batch as the step got it, and the FLOPs the module reported for it."""

    def __init__(self):
        self.batches, self.flops = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch)
        self.flops.append(pl_module.flops_per_batch)


def test_the_datamodule_has_the_module_prepare_its_batches_and_the_monitor_gets_their_flops(tmp_path):
    module = InstructModule(teacher="tiny", window=64, lr=1e-3, warmup_ratio=0.0)
    seen = Seen()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[seen, TokenThroughput(window_size=2)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule(corpus(tmp_path)))
    odd = [str(w.message) for w in caught if "batch_transfer" in str(w.message) or "flops" in str(w.message)]
    assert not odd, odd
    assert len(seen.batches) == 2
    for batch, flops in zip(seen.batches, seen.flops):
        assert "position_ids" in batch and "label_positions" in batch  # computed on the host, by the module
        lengths = sequence_lengths(batch)
        assert sum(lengths) == batch["tokens"] and len(lengths) == len(batch["sources"])
        assert flops == hybrid_batch_flops(module.model, lengths).total > 0
