"""Benchmark evaluation on VLMEvalKit-format TSV files (``python -m ivl.evaluate``)."""
