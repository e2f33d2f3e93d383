"""Start the server (``python -m ivl.serve``) in a subprocess on a free port and wait until it answers /health:
for tests and the serving benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    *args: str,
    log_path: Path,
    env: dict | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
    entry: tuple[str, ...] = ("-m", "ivl.serve"),
):
    """Yields (base URL, process) of a server started with ``args`` in ``cwd``; its output goes to ``log_path``.
    ``entry``: what python runs (``python -m ivl.serve``, or the path of ``lightning_app.py``)."""
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, *entry, "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            log.seek(0)
            raise RuntimeError(f"the server did not start:\n{log.read()[-3000:]}")
        yield url, proc
    finally:
        import psutil

        try:  # anything the server started (a tokenizer's worker pool, say) goes with it
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
