"""Pure-ASGI middleware: request id + metrics + access line, per-request deadline, request body limit (413)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import DeadlineExceeded, error_response
from app.core.logging import access_logger
from app.core.metrics import Metrics, outcome

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's id is echoed only when it is this tame


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the streamed body passes the limit. An HTTPException, so FastAPI's body
    parsing re-raises it as is (instead of a generic 400) and the error handlers render it."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, and while streaming (chunked bodies)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large",
                                  f"request body exceeds the limit of {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


class RequestMiddleware:
    """Outermost, per HTTP request: a request id (the client's `X-Request-ID` when tame, else a new one) bound
    into every log line and echoed in the response; the in-flight gauge; count and latency per (method, route
    template, status) (templates keep label sets small); one access line. A client that disconnected before
    its response is recorded as 499, not 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status = None
        t0 = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        self.metrics.in_flight.inc()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight.dec()
            status = status or 500  # no response and no known disconnect: a bug's 500 (logged by the handler)
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            method = scope.get("method", "")
            latency = time.perf_counter() - t0
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(latency)
            self.metrics.http_server_requests.labels(method, route, str(status), outcome(status)).observe(latency)
            access_logger.info("request", method=method, path=scope.get("path"), route=route, status=status,
                               latency_ms=round(1000 * latency, 2))


class DeadlineMiddleware:
    """A request still running after `seconds` is answered 503 (Retry-After) and its awaiting is cancelled. A
    worker thread already started cannot be stopped; it finishes and frees its slot then (see admission)."""

    def __init__(self, app: ASGIApp, seconds: float, metrics: Metrics, exempt: tuple[str, ...] = ("/health",)):
        self.app, self.seconds, self.metrics, self.exempt = app, seconds, metrics, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(self.seconds) as deadline:
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            self.metrics.shed.labels("deadline").inc()
            error = DeadlineExceeded(f"the request took longer than its deadline of {self.seconds:g}s")
            await error_response(503, error.code, error.message, headers=error.headers)(scope, receive, send)
