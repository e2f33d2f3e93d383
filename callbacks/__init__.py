"""Lightning callbacks for ivl's stages: layer freezing, LoRA injection, MLflow tracking, throughput, duration, finite
losses."""

# Only as ``ivl.callbacks``: imported by this generic name from the repository root, the folder stays an empty
# module (see kernels/__init__.py).
if __name__.startswith("ivl."):
    from ivl.callbacks.duration import RunDuration
    from ivl.callbacks.finite_loss import FiniteLoss
    from ivl.callbacks.freezing import LayerFreezing
    from ivl.callbacks.lora import LoRAInjection
    from ivl.callbacks.mlflow import MLflowTracking
    from ivl.callbacks.throughput import TokenThroughput

    __all__ = ["FiniteLoss", "LayerFreezing", "LoRAInjection", "MLflowTracking", "RunDuration", "TokenThroughput"]
