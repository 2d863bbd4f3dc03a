"""A real uvicorn process serving this tree's app on a free loopback port (for the client/CLI and browser tests,
which must talk HTTP to a server, not to an in-process TestClient). No tests here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(store: Path, timeout_s: float = 120.0, **settings: str):
    """Yield the base URL once /health/ready answers 200; the process is terminated (then killed) after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLORA_")}
    env |= {"PYTHONPATH": str(ROOT), "SGLORA_STORE_PATH": str(store), "SGLORA_DEVICE": "cpu"}
    env |= {f"SGLORA_{k.upper()}": v for k, v in settings.items()}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
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
