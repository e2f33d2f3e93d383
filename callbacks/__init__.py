"""Lightning callbacks for ivl's stages: layer freezing, LoRA injection, MLflow tracking, token throughput."""

from ivl.callbacks.freezing import LayerFreezing
from ivl.callbacks.lora import LoRAInjection
from ivl.callbacks.mlflow import MLflowTracking
from ivl.callbacks.throughput import TokenThroughput

__all__ = ["LayerFreezing", "LoRAInjection", "MLflowTracking", "TokenThroughput"]
