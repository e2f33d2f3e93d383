"""The three training stages, one LightningModule each."""

from ivl.stages.base import StageModule
from ivl.stages.distill import DistillModule
from ivl.stages.distributed import FSDP2Strategy
from ivl.stages.instruct import InstructModule
from ivl.stages.long_context import LongContextModule

__all__ = ["DistillModule", "FSDP2Strategy", "InstructModule", "LongContextModule", "StageModule"]
