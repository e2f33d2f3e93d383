"""Outbox: calls to a tracking server made in order on a background thread, so that training never waits for it.

While the server is unreachable, calls wait in the outbox and the first one is retried (every few seconds, up to a
minute apart); metric batches beyond ``max_values`` values drop the oldest ones (counted). One line says the server
went away, one that it came back. A call the server refuses for another reason (a bad value, say) is dropped with
one line. ``close`` waits for the outbox to empty while the server answers, and gives up once it has not answered for
``patience`` seconds: what is left is returned, for the caller to say what was not logged.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Call:
    label: str  # what it logs, for messages: "metrics", "hyperparameters", "artifact runs/x/config.yaml", ...
    run: Callable[[], Any]
    metrics: list = field(default_factory=list)  # the metric values it carries (MLflow Metric objects)


def unreachable(error: BaseException) -> bool:
    """A server that is down, refuses connections, times out or answers 5xx (as opposed to refusing the call)."""
    import requests

    seen = error
    while seen is not None:
        if isinstance(
            seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "error code 5"))


class Outbox:
    def __init__(self, where: str, max_values: int = 1_000_000, retry: tuple[float, float] = (2.0, 60.0)):
        self.where, self.max_values, self.retry = where, max_values, retry
        self.calls: deque[Call] = deque()
        self.values = self.dropped = 0
        self.down_since: float | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._deliver, name="ivl-tracking-outbox", daemon=True)
        self._thread.start()

    def put(self, call: Call) -> None:
        with self._wake:
            self.calls.append(call)
            self.values += len(call.metrics)
            while self.values > self.max_values:  # the oldest metric batch goes first
                oldest = next((c for c in self.calls if c.metrics), None)
                if oldest is None:
                    break
                self.calls.remove(oldest)
                self.values -= len(oldest.metrics)
                self.dropped += len(oldest.metrics)
            self._wake.notify()

    def close(self, patience: float = 30.0) -> list[Call]:
        """Waits while calls are delivered; stops waiting once the server has been unreachable ``patience`` seconds
        (or at once if it already has). Returns the calls left undelivered."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            while self.calls and not (self.down_since is not None and time.monotonic() - self.down_since >= patience):
                self._wake.wait(timeout=0.5)
            left = list(self.calls)
            self.calls.clear()
            self._wake.notify()
        return left

    def _deliver(self) -> None:
        delay = self.retry[0]
        while True:
            with self._wake:
                while not self.calls:
                    if self._closing:
                        return
                    self._wake.wait()
                call = self.calls[0]
            try:
                call.run()
            except Exception as error:  # noqa: BLE001  (whatever the client raises, training goes on)
                if unreachable(error):
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        _say(
                            f"ivl: the tracking server at {self.where} does not answer ({_short(error)}); training "
                            f"goes on, and what it logs waits here until the server is back"
                        )
                    with self._wake:
                        self._wake.wait(timeout=delay)  # a close() wakes it to give up sooner
                    delay = min(2 * delay, self.retry[1])
                    continue
                _say(f"ivl: the tracking server at {self.where} refused {call.label}: {_short(error)}")
            with self._wake:
                if self.calls and self.calls[0] is call:
                    self.calls.popleft()
                    self.values -= len(call.metrics)
                self._wake.notify_all()
            if self.down_since is not None:
                _say(f"ivl: the tracking server at {self.where} is back; {len(self.calls)} waiting call(s) go now")
                self.down_since, delay = None, self.retry[0]


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
