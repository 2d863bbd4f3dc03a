"""Shared helpers for the service tests (no tests here): apps on the tiny store, Redis key isolation, images."""

from __future__ import annotations

import base64
import io
import uuid
from contextlib import contextmanager

import pytest
import redis
from fastapi.testclient import TestClient

REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once
# The service's 0.25 s Redis timeouts fail fast in production; in a test on a busy machine the event loop can stall
# past them with the reply already there, and one timeout turns the cache off for the backoff (hits become misses,
# the generation lock is skipped). A test of an unreachable Redis uses a closed port (refused at once) or its own.
REDIS_TIMEOUTS = {"redis_socket_timeout_s": 5.0, "redis_connect_timeout_s": 5.0}


def settings_for(store, **overrides):
    from app.core.config import Settings

    return Settings(**({"store_path": store, "device": "cpu", "redis_url": REDIS_URL,
                        "redis_prefix": f"sglora-test:{uuid.uuid4().hex[:12]}:", "_env_file": None}
                       | REDIS_TIMEOUTS | overrides))


def redis_timeout_env() -> dict[str, str]:
    """REDIS_TIMEOUTS as the environment of a server process."""
    return {f"SGLORA_{k.upper()}": str(v) for k, v in REDIS_TIMEOUTS.items()}


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:  # the Makefile and .ci/run start one; a missing server is a setup error
        pytest.fail(f"these tests need a Redis server at {REDIS_URL} (scripts/ensure-redis.sh starts one): {e}")
    return client


def drop_prefix(prefix: str) -> None:
    client = redis_client()
    keys = list(client.scan_iter(match=prefix + "*", count=500))
    if keys:
        client.delete(*keys)


@contextmanager
def serving(settings):
    """A started app (lifespan run) and its client; Redis keys under the settings' prefix are removed after."""
    from app.main import create_app

    app = create_app(settings)
    try:
        with TestClient(app) as client:
            yield client
    finally:
        if settings.redis_url == REDIS_URL:
            drop_prefix(settings.redis_prefix)


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def encode(image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def metric(client, name: str, **labels) -> float:
    """The value of one sample from /metrics (0.0 when the labelled series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own (in memory, nothing on disk) that the test may stop and restart; the
    shared Redis on 6379 is never touched."""

    def __init__(self, port: int | None = None):
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed (scripts/ensure-redis.sh installs it)")
        self._port_is_ours_to_pick = port is None
        self._use_port(port or free_port())
        self.process = None

    def _use_port(self, port: int) -> None:
        self.port, self.url = port, f"redis://127.0.0.1:{port}/0"

    def start(self) -> PrivateRedis:
        """Start redis-server and wait (30 s at most) until it answers as itself. Its port was picked free and is
        bound only now, so another process may hold it meanwhile (another test's private Redis answers PING just
        as well): INFO's process_id tells ours apart. A first start whose port was taken retries on another one."""
        for _ in range(3):
            if self._start_once():
                return self
            if not self._port_is_ours_to_pick:
                break
            self._use_port(free_port())
        raise RuntimeError(f"private redis-server could not start on port {self.port} (taken by another process?)")

    def _start_once(self) -> bool:
        import subprocess
        import time

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 30
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                if client.info("server")["process_id"] == self.process.pid:
                    self._port_is_ours_to_pick = False  # a restart must come back on this port
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Server:
    """`python -m app` (the production runner) in a subprocess on a port it binds itself (port 0, read back from its
    log: tests/live_server.py says why), from this tree's code; its stderr (JSON log lines) is kept in `log_path`.
    Stopped (and waited for) on exit."""

    def __init__(self, store, tmp_path, redis_url: str | None = REDIS_URL, **settings):
        self.url = None  # known once the server listens
        self.prefix = f"sglora-test:{uuid.uuid4().hex[:12]}:"
        self.redis_url = redis_url
        self.log_path = tmp_path / f"server-{self.prefix.split(':')[1]}.log"
        self.env = {"SGLORA_STORE_PATH": str(store), "SGLORA_DEVICE": "cpu", "SGLORA_REDIS_PREFIX": self.prefix}
        if redis_url:
            self.env |= {"SGLORA_REDIS_URL": redis_url} | redis_timeout_env()
        self.env |= {f"SGLORA_{k.upper()}": str(v) for k, v in settings.items()}
        self.process = None

    def __enter__(self) -> Server:
        import os
        import subprocess
        import sys
        import time
        from pathlib import Path

        import httpx

        from tests.live_server import announced_url

        root = Path(__file__).resolve().parents[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SGLORA_")} | self.env
        env["PYTHONPATH"] = str(root)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen([sys.executable, "-m", "app", "--port", "0"], cwd=root, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        try:
            self.url = announced_url(self.process, self.log_path, 120)
        except RuntimeError:
            self.__exit__(None, None, None)
            raise
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server not ready in 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        import json

        records = []
        for line in self.log().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append({"unparsed": line})
        return records

    def metric(self, name: str, **labels) -> float:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()
        if self.redis_url == REDIS_URL:
            drop_prefix(self.prefix)


@contextmanager
def threaded_server(settings):
    """This tree's app under real uvicorn, configured as `python -m app` configures it, in a thread of this
    process: clients talk HTTP over real sockets while the test reaches into the app (gates an engine step on
    an event, reads app.state). Yields (app, uvicorn server, base URL); stopped and its Redis keys removed after."""
    import socket
    import threading
    import time

    import uvicorn

    from app.__main__ import server_config
    from app.main import create_app

    app = create_app(settings)
    # Bound here and handed to uvicorn: a port picked free, closed and bound later could be taken in between.
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only then (else ~45 ms per request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, settings, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        yield app, server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        if settings.redis_url == REDIS_URL:
            drop_prefix(settings.redis_prefix)
