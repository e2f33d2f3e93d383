"""TokenThroughput: Lightning's ThroughputMonitor, told how to count samples and tokens in ivl batches."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor

from ivl.stages.host_batch import count_tokens


def _samples(batch) -> int:
    return len(batch["sources"]) if "sources" in batch else batch["input_ids"].shape[0]


class TokenThroughput(ThroughputMonitor):
    """Logs samples/s and tokens/s (``throughput/*``) of training batches, packed or padded."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_samples, length_fn=count_tokens, window_size=window_size)

    def on_test_start(self, *args, **kwargs) -> None:
        pass  # `test` runs benchmarks (ivl.evaluate.EvalDataModule): batches of questions, generated, not fed

    def on_test_batch_end(self, *args, **kwargs) -> None:
        pass
