"""A real uvicorn process serving this tree's app on a loopback port (for the client/CLI and browser tests,
which must talk HTTP to a server, not to an in-process TestClient); in a thread of the test's process:
tests.test_service_support.threaded_server. No tests here.

Servers started by the tests bind port 0 themselves and announce the port the kernel gave them (`announced_url`):
a port the test picked free, closed and handed to the server to bind later could be taken by another process in
between (another test's server on this shared machine), and the test would then talk to that one."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
_ANNOUNCED = re.compile(rb"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def free_port() -> int:
    """For servers that cannot bind port 0 and report it (nginx). Racy: prefer `--port 0` and `announced_url`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def announced_url(process: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """The base URL a uvicorn started with `--port 0` logs once it listens ("Uvicorn running on ...": uvicorn's
    info line, in plain or JSON logs), read from the file its output goes to."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = _ANNOUNCED.search(log.read_bytes())
        if found:
            return found.group(1).decode()
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server announced no address within {timeout_s} s: "
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@contextmanager
def live_server(store: Path, timeout_s: float = 120.0, **settings: str):
    """Yield the base URL once /health/ready answers 200; the process is terminated (then killed) after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLORA_")}
    env |= {"PYTHONPATH": str(ROOT), "SGLORA_STORE_PATH": str(store), "SGLORA_DEVICE": "cpu"}
    env |= {f"SGLORA_{k.upper()}": v for k, v in settings.items()}
    with tempfile.TemporaryDirectory(prefix="sglora-live-server-") as logs:
        log_path = Path(logs) / "uvicorn.log"
        with log_path.open("wb") as log:  # a file, not a pipe: a pipe nobody reads blocks the server once full
            proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                                     "--port", "0", "--log-level", "info", "--no-access-log"], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            url = announced_url(proc, log_path, timeout_s)
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready within {timeout_s} s")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

