"""Overload at the edge, against real uvicorn with `python -m app`'s configuration (in a thread of this process,
so a test can hold an engine step on an event): bodies refused from their headers before any byte is uploaded,
model work stopped when its client leaves (499, counted), an accelerator out-of-memory answered 503, and a
connection that never finishes its headers closed."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from tests.test_service_support import png_b64, settings_for, threaded_server

MAX_BODY = 1024 * 1024
# Every request to this module's server must deliver its headers within this: 0.5 s could be missed by a client
# thread descheduled between connect and send on a busy machine (a 408 for a well-formed request).
HEADER_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def served(tiny_build):
    """One model-work slot, no queue, bodies of at most 1 MiB each and 1.5 MiB in all."""
    settings = settings_for(tiny_build.out, max_concurrent_work=1, max_queued_work=0, max_body_bytes=MAX_BODY,
                            max_body_bytes_in_flight=MAX_BODY * 3 // 2, header_timeout_s=HEADER_TIMEOUT_S)
    with threaded_server(settings) as running:
        yield running


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def value(metric, **labels) -> float:
    return (metric.labels(**labels) if labels else metric)._value.get()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def headers_only(path: str, length: int, expect: bool = False) -> bytes:
    """A request's head announcing `length` bytes of JSON body, none of which is sent."""
    extra = "Expect: 100-continue\r\n" if expect else ""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_a_body_over_the_global_budget_is_refused_before_it_is_uploaded(served):
    app, _, url = served
    metrics = app.state.metrics
    uploading = connect(url)  # holds 1 MiB of the 1.5 MiB budget while its upload is under way
    uploading.sendall(headers_only("/retrieve", MAX_BODY) + b'{"images": [')
    wait_for(lambda: value(metrics.body_bytes) == MAX_BODY, "the first body to be admitted")

    for expect in (True, False):  # curl's Expect: 100-continue, and a client that would just upload
        with connect(url) as sock:
            sock.sendall(headers_only("/retrieve", MAX_BODY // 2 + 1, expect=expect))  # no body byte sent
            status, headers, body = read_response(sock)
            assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
            error = json.loads(body)["error"]
            assert error["code"] == "overloaded" and "bytes of request bodies" in error["message"]
            assert sock.recv(1) == b""  # closed: the body is not wanted
    assert value(metrics.shed, reason="body_budget") == 2

    uploading.close()  # the first client gives up: its reservation is given back
    wait_for(lambda: value(metrics.body_bytes) == 0, "the budget to be released")
    small = {"description": "a photo of a small red circle", "strategy": "topk_weighted"}
    assert httpx.post(url + "/generate-lora", json=small, timeout=60).status_code == 200


@pytest.fixture
def held_describe(served):
    """engine.describe (the first model step of a generation) blocks until the test releases it."""
    app = served[0]
    engine, original = app.state.engine, app.state.engine.describe
    entered, release = threading.Event(), threading.Event()

    def describe(description):
        entered.set()
        assert release.wait(60), "the test never released the model step"
        return original(description)

    engine.describe = describe
    try:
        yield entered, release
    finally:
        release.set()
        engine.describe = original


def test_a_client_gone_during_model_work_stops_the_work_and_is_logged_499(served, held_describe):
    app, server, url = served
    entered, release = held_describe
    metrics = app.state.metrics
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.msg)
    logging.getLogger("sglora.access").addHandler(handler)
    body = json.dumps({"description": "a photo of a request whose client leaves", "strategy": "topk_weighted"})
    generated = value(metrics.generations, strategy="topk_weighted")
    try:
        client = connect(url)
        client.sendall(f"POST /generate-lora HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\nX-Request-ID: leaves-early\r\n\r\n{body}".encode())
        assert entered.wait(60), "the generation never reached the model"

        # Its one slot is busy and nothing may queue: /retrieve is refused from its headers, body unread.
        with connect(url) as sock:
            sock.sendall(headers_only("/retrieve", 5000))
            status, headers, body503 = read_response(sock)  # an answer although no body byte was sent
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body503)["error"]["code"] == "overloaded"
        assert value(metrics.shed, reason="queue_full") == 1

        client.close()  # the client leaves while the model works for it
        wait_for(lambda: not server.server_state.connections, "the server to see the disconnect")
        release.set()
        wait_for(lambda: value(metrics.requests, method="POST", route="/generate-lora", status="499") == 1,
                 "the request to end as 499")
    finally:
        logging.getLogger("sglora.access").removeHandler(handler)
    assert value(metrics.work_cancelled, step="generate_files") == 1  # the generation step never ran
    assert value(metrics.generations, strategy="topk_weighted") == generated
    access = [line for line in lines if isinstance(line, dict) and line.get("request_id") == "leaves-early"]
    assert [line["status"] for line in access] == [499]
    wait_for(lambda: value(metrics.work_running) == 0, "the slot to be given back")


def test_accelerator_out_of_memory_is_a_503_and_the_server_goes_on(served):
    app, _, url = served
    engine, original = app.state.engine, app.state.engine.retrieve

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    body = {"images": [png_b64(Image.new("RGB", (32, 32), (200, 30, 30)))], "texts": ["a red square"]}
    engine.retrieve = out_of_memory  # fault injection: the forward runs out of accelerator memory
    try:
        r = httpx.post(url + "/retrieve", json=body, timeout=60)
    finally:
        engine.retrieve = original
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "out_of_memory"
    assert value(app.state.metrics.shed, reason="out_of_memory") == 1
    assert httpx.post(url + "/retrieve", json=body, timeout=60).status_code == 200


def test_a_connection_that_never_finishes_its_headers_is_closed(served):
    _, _, url = served
    with connect(url) as silent, connect(url) as partial:
        partial.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")  # the blank line never comes
        for sock in (partial, silent):
            received = b""
            while chunk := sock.recv(4096):  # until the server closes (the socket's own timeout: 30 s)
                received += chunk
            assert received.startswith(b"HTTP/1.1 408")
    with httpx.Client(base_url=url) as client:  # a complete request is not affected, nor keep-alive
        assert [client.get("/health/live").status_code for _ in range(2)] == [200, 200]
