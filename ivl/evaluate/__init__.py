"""Benchmark evaluation on VLMEvalKit-format TSV files (``python -m ivl.evaluate``, or the stage CLI's ``test``
with ``EvalDataModule``)."""


def __getattr__(name):  # the DataModule (and Lightning) load only when a config names it
    if name == "EvalDataModule":
        from ivl.evaluate.datamodule import EvalDataModule

        return EvalDataModule
    raise AttributeError(name)
