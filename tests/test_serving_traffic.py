"""Serving under real traffic, against `python -m app` in a subprocess (real uvicorn, real Redis): overload is a
fast 503 with Retry-After, a client that left is not a 5xx and its queued work is dropped, SIGTERM turns
readiness 503 while an in-flight request completes, and the logs are JSON lines with request ids.

The slow request is a real one: 8 solid-colour 4096x4096 PNGs (0.5 MB of body, 134 Mpx to decode)."""

from __future__ import annotations

import base64
import io
import signal
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.test_service_support import Server

HEAVY_IMAGES = 8


@pytest.fixture(scope="module")
def heavy_body():
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 30)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    return {"images": [image] * HEAVY_IMAGES, "texts": ["a red square", "a blue circle"]}


LIGHT = {"description": "a photo of a small red circle", "strategy": "topk_weighted"}
# Long enough for the two requests the SIGTERM test makes during the delay, however busy the machine: once it is
# over the server stops accepting, and a check still under way would fail with a refused connection.
SHUTDOWN_DELAY_S = 5.0
HEAVY_SETTINGS = {"max_request_pixels": HEAVY_IMAGES * 4096 * 4096, "decode_workers": 1}


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def in_background(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def limited(tiny_build, tmp_path_factory):
    """One slot and no queue."""
    with Server(tiny_build.out, tmp_path_factory.mktemp("limited"), max_concurrent_work=1, max_queued_work=0,
                shutdown_delay_s=SHUTDOWN_DELAY_S, shutdown_grace_s=60, **HEAVY_SETTINGS) as server:
        yield server


def send_partial_body_and_leave(url: str, path: str) -> None:
    """A client that announces a 1 MB body, sends 100 bytes and disconnects (a timeout, a closed tab)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 1000000\r\n\r\n".encode() + b'{"images": [' + b" " * 88)


def test_over_the_limit_is_a_fast_503_with_retry_after_and_disconnects_are_not_5xx(limited, heavy_body):
    server = limited
    heavy, first = in_background(lambda: httpx.post(server.url + "/retrieve", json=heavy_body, timeout=120))
    wait_for(lambda: server.metric("sglora_work_running") == 1, what="the heavy request to hold the slot")

    r = httpx.post(server.url + "/generate-lora", json=LIGHT, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "overloaded"
    # "Fast" is the path, not a stopwatch (a busy machine stretches any one): refused because the queue was full,
    # not after waiting for the slot, which would count as wait_timeout.
    assert server.metric("sglora_shed_total", reason="queue_full") == 1
    assert server.metric("sglora_shed_total", reason="wait_timeout") == 0
    assert server.metric("sglora_generations_total") == 0  # refused before any work

    heavy.join(120)
    assert first["value"].status_code == 200
    # Admitted now (a busy slot would refuse it from its headers, before its upload): it leaves mid-upload.
    send_partial_body_and_leave(server.url, "/retrieve")
    wait_for(lambda: server.metric("sglora_http_requests_total", route="/retrieve", status="499") == 1,
             what="the upload that was cut to be recorded as 499")
    fives = [s for s in ("500", "502", "504") if server.metric("sglora_http_requests_total", status=s)]
    assert fives == [] and "Traceback" not in server.log()
    assert server.metric("sglora_work_running") == 0 and server.metric("sglora_work_queue_depth") == 0
    assert server.metric("sglora_http_requests_in_flight") == 1  # this /metrics request itself


def test_logs_are_json_lines_with_request_ids_and_an_access_line(limited):
    server = limited
    r = httpx.post(server.url + "/generate-lora", json=LIGHT, headers={"X-Request-ID": "req-42"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    minted = httpx.get(server.url + "/experts", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=30)
    assert len(minted.headers["x-request-id"]) == 32  # an untidy id is replaced, never echoed

    def access_lines(request_id: str) -> list[dict]:
        return [r for r in server.log_records() if r.get("logger") == "sglora.access"
                and r.get("request_id") == request_id]

    # The access line may be written after the client has its response: wait for it, not for a guessed 0.3 s.
    wait_for(lambda: access_lines("req-42") and access_lines(minted.headers["x-request-id"]), what="access lines")
    records = server.log_records()
    assert not [r for r in records if "unparsed" in r], "every line is JSON"
    assert any(r.get("logger") == "app.services.engine" and "engine ready" in r["event"] for r in records)
    access = [r for r in records if r.get("logger") == "sglora.access" and r.get("request_id") == "req-42"]
    assert len(access) == 1
    line = access[0]
    assert (line["route"], line["status"], line["cache"], line["strategy"]) == (
        "/generate-lora", 200, "miss", "topk_weighted")
    assert line["latency_ms"] > 0 and line["level"] == "info"


def test_sigterm_turns_readiness_503_while_an_in_flight_request_completes(limited, heavy_body):
    """Last in this module: it stops the server."""
    server = limited
    heavy, result = in_background(lambda: httpx.post(server.url + "/retrieve", json=heavy_body, timeout=120))
    wait_for(lambda: server.metric("sglora_work_running") == 1, what="the request to be in flight")
    server.process.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    ready = httpx.get(server.url + "/health/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"  # at once: the delay has not ended
    # Still serving during the delay (the load balancer has not caught up yet): a cache hit needs no slot.
    assert httpx.post(server.url + "/generate-lora", json=LIGHT, timeout=30).headers["x-cache"] == "hit"
    heavy.join(120)
    assert result["value"].status_code == 200 and len(result["value"].json()["images"]) == HEAVY_IMAGES
    assert server.process.wait(timeout=60) == 0
    assert time.monotonic() - t0 >= SHUTDOWN_DELAY_S  # it did wait the configured delay
