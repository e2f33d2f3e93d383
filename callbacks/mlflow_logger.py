"""BufferedMLFlowLogger: Lightning's MLFlowLogger whose writes never make training wait for the tracking server."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from ivl.callbacks.outbox import Call, Outbox, unreachable
from ivl.errors import UsageError

# Calls that write to the server: queued in the outbox. Everything else (reads) goes straight through.
WRITES = {
    "log_batch",
    "log_metric",
    "log_param",
    "set_tag",
    "set_terminated",
    "update_run",
    "log_artifact",
    "log_artifacts",
    "log_dict",
    "log_text",
}


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger (same arguments), with every write to the server going through an ``Outbox``:
    a server that stops answering mid-fit costs one warning line and nothing else. Its metrics wait (at most
    ``max_buffered_values`` of them) and go when it is back. At the end, the fit waits for the outbox while the
    server answers, or ``final_patience`` seconds once it does not; then one line says what was not logged, and the
    metrics among it are written to ``<local_dir>/mlflow-unsent-<run id>.csv`` (``local_dir``: the trainer's
    ``default_root_dir`` unless given). The exit code stays the fit's.

    The client's own retries are cut to one attempt of ``request_timeout`` seconds (``MLFLOW_HTTP_REQUEST_*``,
    unless set), so that a dead server is noticed in seconds; the outbox does the retrying. A server that does not
    answer when the run is created (before any training) stops the fit at once with one line.
    """

    def __init__(
        self,
        *args,
        max_buffered_values: int = 1_000_000,
        final_patience: float = 30.0,
        request_timeout: float = 10.0,
        local_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(request_timeout)))
        self.max_buffered_values, self.final_patience, self.local_dir = max_buffered_values, final_patience, local_dir
        self.checkpoint_dir: str | None = None  # named in the last line when the server did not come back
        self._outbox: Outbox | None = None
        self._finalized = False

    @property
    @rank_zero_experiment
    def experiment(self):
        try:
            client = super().experiment
        except Exception as error:
            if unreachable(error):
                raise UsageError(
                    f"the MLflow tracking server at {self._tracking_uri} does not answer; start it, or "
                    f"set MLFLOW_TRACKING_URI to another store (nothing was trained)"
                ) from None
            raise
        if self._outbox is None:
            self._outbox = Outbox(str(self._tracking_uri), self.max_buffered_values)
        return _Deferred(client, self._outbox)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized or self._finalized:
            return
        self._finalized = True
        status = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(status, status)
        if getattr(self, "interrupted", False):  # stopped by a signal, with a checkpoint (CheckpointOnSignal)
            status = "KILLED"
        if self._checkpoint_callback:  # log_model: Lightning's own checkpoint upload, queued like the rest
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        self.experiment.set_terminated(self.run_id, status)
        left = self._outbox.close(self.final_patience)
        if self._outbox.dropped or left:
            self._report(left)

    def _report(self, left: list[Call]) -> None:
        metrics = [m for call in left for m in call.metrics]
        others = [call.label for call in left if not call.metrics]
        parts = []
        if metrics or self._outbox.dropped:
            steps = sorted({m.step for m in metrics})
            parts.append(
                f"{len(metrics) + self._outbox.dropped} metric values"
                + (f" (steps {steps[0]}-{steps[-1]})" if steps else "")
            )
        parts += others
        where = []
        if metrics:
            path = Path(self.local_dir or ".") / f"mlflow-unsent-{self.run_id}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["key", "value", "step", "timestamp"])
                writer.writerows([m.key, m.value, m.step, m.timestamp] for m in metrics)
            where.append(f"the metrics are in {path}")
        if self._outbox.dropped:
            where.append(f"{self._outbox.dropped} of the oldest were dropped (max_buffered_values)")
        if self.checkpoint_dir:
            where.append(f"the checkpoints in {self.checkpoint_dir}")
        print(
            f"ivl: the tracking server at {self._tracking_uri} did not take "
            f"{', '.join(parts)} of run {self.run_id}; {'; '.join(where) or 'nothing is kept of them'}",
            flush=True,
        )


class _Deferred:
    """The MLflow client with its writes queued in the outbox; reads go straight to the server."""

    def __init__(self, client, outbox: Outbox):
        self._client, self._outbox = client, outbox

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if name not in WRITES:
            return attribute

        def queued(*args, **kwargs):
            metrics = list(kwargs.get("metrics") or [])
            label = "metrics" if metrics else "hyperparameters" if kwargs.get("params") else _label(name, args)
            self._outbox.put(Call(label, lambda: attribute(*args, **kwargs), metrics))

        return queued


def _label(name: str, args: tuple) -> str:
    if name in ("log_artifact", "log_artifacts"):
        return f"the artifact {args[1] if len(args) > 1 else ''}".strip()
    if name == "set_terminated":
        return "the run's end"
    if name == "set_tag":
        return f"the tag {args[1] if len(args) > 1 else ''}".strip()
    return name.replace("_", " ")
