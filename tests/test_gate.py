"""The admission gate at unit level (no model, no server): what it refuses it refuses from the headers, without
receiving a byte of the body or calling the app; what it admits holds its share of the body budget until the
request ends."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from app.api.gate import CLOSE_ABOVE, AdmissionGateMiddleware
from app.core.metrics import Metrics
from app.services.admission import Admission, BodyBudget

LIMIT = 1000


def scope(path: str, length: int | None, admission: Admission | None = None, chunked: bool = False) -> dict:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    app = SimpleNamespace(state=SimpleNamespace(admission=admission))
    return {"type": "http", "method": "POST", "path": path, "headers": headers, "app": app}


class Recorder:
    """The inner app and the connection: what was received, what was sent, whether the app ran."""

    def __init__(self, gate_budget: BodyBudget | None = None):
        self.received, self.sent, self.ran, self.budget_seen = 0, [], False, None
        self.budget = gate_budget

    async def app(self, scope, receive, send) -> None:
        self.ran = True
        self.budget_seen = self.budget.used if self.budget else None
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive(self) -> dict:
        self.received += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def error(self) -> dict:
        return json.loads(self.sent[1]["body"])["error"]


def gate(budget: BodyBudget, recorder: Recorder) -> AdmissionGateMiddleware:
    return AdmissionGateMiddleware(recorder.app, budget, work_paths=("/retrieve",), chunked_reserve=LIMIT)


def test_a_body_that_does_not_fit_the_budget_is_refused_unread():
    budget = BodyBudget(100 * 1024, Metrics())
    budget.reserve(60 * 1024)  # another request's body in flight
    rec = Recorder(budget)
    asyncio.run(gate(budget, rec)(scope("/generate-lora", 50 * 1024), rec.receive, rec.send))
    assert rec.status == 503 and rec.headers["retry-after"] == "1" and "connection" not in rec.headers
    assert rec.error["code"] == "overloaded" and "bytes of request bodies" in rec.error["message"]
    assert rec.received == 0 and not rec.ran and budget.used == 60 * 1024

    big = BodyBudget(10 * CLOSE_ABOVE, Metrics())
    big.reserve(9 * CLOSE_ABOVE)
    rec = Recorder(big)
    asyncio.run(gate(big, rec)(scope("/retrieve", 2 * CLOSE_ABOVE), rec.receive, rec.send))
    assert rec.status == 503 and rec.headers["connection"] == "close"  # a large unread body is not drained
    assert rec.received == 0 and not rec.ran


def test_an_admitted_body_holds_its_share_until_the_request_ends():
    budget = BodyBudget(100_000, Metrics())
    rec = Recorder(budget)
    asyncio.run(gate(budget, rec)(scope("/generate-lora", 4000), rec.receive, rec.send))
    assert rec.ran and rec.status == 200 and rec.budget_seen == 4000 and budget.used == 0

    rec = Recorder(budget)  # chunked: no length announced, so it reserves the most a body may be
    asyncio.run(gate(budget, rec)(scope("/generate-lora", None, chunked=True), rec.receive, rec.send))
    assert rec.ran and rec.budget_seen == LIMIT and budget.used == 0


def test_a_retrieve_that_admission_would_refuse_is_refused_from_its_headers():
    async def scenario():
        admission = Admission(1, 0, 1.0, decode_workers=1, metrics=Metrics())
        budget = BodyBudget(100_000, Metrics())
        async with admission.slot():  # the one slot is busy, nothing may queue
            rec = Recorder(budget)
            await gate(budget, rec)(scope("/retrieve", 5000, admission), rec.receive, rec.send)
            assert rec.status == 503 and rec.error["code"] == "overloaded" and rec.received == 0 and not rec.ran
            assert admission.metrics.shed.labels("queue_full")._value.get() == 1
            other = Recorder(budget)  # a route that may not need the model (a cache hit) goes on
            await gate(budget, other)(scope("/generate-lora", 100, admission), other.receive, other.send)
            assert other.ran and other.status == 200
        rec = Recorder(budget)
        await gate(budget, rec)(scope("/retrieve", 5000, admission), rec.receive, rec.send)
        assert rec.ran and rec.status == 200

    asyncio.run(scenario())
