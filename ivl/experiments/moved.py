"""Class paths that moved, still accepted in configs (with one line naming the new path).

``ivl.callbacks`` re-exported its callbacks until it became a namespace package (see CONTRIBUTING.md: a folder
without ``__init__.py`` cannot shadow an installed package of the same name). Configs written before, the saved
``config.yaml`` of every earlier run among them, name ``ivl.callbacks.TokenThroughput`` and the like.
"""

from __future__ import annotations

import importlib
import sys

MOVED = {
    "ivl.callbacks.FiniteLoss": "ivl.callbacks.finite_loss.FiniteLoss",
    "ivl.callbacks.LayerFreezing": "ivl.callbacks.freezing.LayerFreezing",
    "ivl.callbacks.LoRAInjection": "ivl.callbacks.lora.LoRAInjection",
    "ivl.callbacks.MLflowTracking": "ivl.callbacks.mlflow.MLflowTracking",
    "ivl.callbacks.RunDuration": "ivl.callbacks.duration.RunDuration",
    "ivl.callbacks.TokenThroughput": "ivl.callbacks.throughput.TokenThroughput",
}
_said: set[str] = set()


def accept_moved_class_paths() -> None:
    """Lets ``import_module("ivl.callbacks").TokenThroughput`` (how jsonargparse resolves a class path) find the
    class at its new place. jsonargparse then records the class's own path, so a config saved by the run has the
    new one."""
    import ivl.callbacks

    def __getattr__(name: str):
        old = f"ivl.callbacks.{name}"
        if old not in MOVED:
            raise AttributeError(f"module 'ivl.callbacks' has no attribute {name!r}")
        module, _, attribute = MOVED[old].rpartition(".")
        if old not in _said:
            _said.add(old)
            print(f"ivl: {old} is now {MOVED[old]}; the config still loads, update it", file=sys.stderr)
        return getattr(importlib.import_module(module), attribute)

    ivl.callbacks.__getattr__ = __getattr__  # PEP 562: looked up in the module's namespace, a namespace package's too
