"""Lightning callbacks (layer freezing, LoRA injection, MLflow tracking), installed as ivl.callbacks."""
