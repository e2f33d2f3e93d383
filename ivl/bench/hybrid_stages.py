"""InfiniteVL's stage modules (``ivl.stages``) as the benchmark trains them: the student config of the bench's
teacher, random weights, batches from a plain DataLoader."""

from __future__ import annotations

from ivl.bench.random_models import random_init_, teacher_config
from ivl.model.convert import student_config
from ivl.stages import DistillModule, InstructModule, LongContextModule


class BenchWeights:
    """Mixed into the stage modules: the 4B (or tiny) student config of the bench teacher, random weights
    instead of rank 0's checkpoint."""

    bench_shapes = "4b"

    def check_sources(self):
        pass  # no folders: the teacher is built in memory, the weights are random

    def student_config(self):
        return student_config(teacher_config(self.bench_shapes), 0.25, self.hparams.window)

    def fill_weights(self, tied):
        random_init_(self.model)

    # Without a DataModule Lightning runs the module's own transfer hooks: the batches are prepared on the host
    # as a DataModule prepares them for the stages.
    def on_before_batch_transfer(self, batch, dataloader_idx):
        return self.prepare_batch(batch)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.batch_arrived(batch)


class BenchInstruct(BenchWeights, InstructModule):
    pass


class BenchLongContext(BenchWeights, LongContextModule):
    pass


class BenchDistill(BenchWeights, DistillModule):
    pass
