"""Admission before the body: a pure-ASGI middleware that refuses from the headers alone, before a byte of the
body is read.

Refusing has to cost far less than serving, or clients that retry at once (most load balancers, naive scripts)
turn overload into a collapse: a refusal that first receives and parses a 30 MB body is nearly as dear as an
answer. Here a request is refused with 503 `overloaded` (Retry-After) at once when

  * its route always needs model work (`work_paths`) and admission would refuse it anyway (queue full, or an
    expected wait past the limit: `Admission.refusal`), or
  * its declared Content-Length does not fit the global budget of body bytes in flight (`BodyBudget`): the
    per-request limit (413) bounds one body, this bounds all of them together.

A body without Content-Length (chunked) reserves the most a body may be (`chunked_reserve`: the body limit,
which the 413 check enforces while it streams). The reservation is given back when the request ends. A refused request's
unread body is not wanted: above `CLOSE_ABOVE` bytes the response says `Connection: close`, so the upload stops
there; a client that sent `Expect: 100-continue` (curl does for large bodies) gets the 503 instead of the 100
and uploads nothing.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import Overloaded, error_response
from app.services.admission import Admission, BodyBudget

CLOSE_ABOVE = 64 * 1024  # a refused body larger than this is not drained: the connection is closed instead


class AdmissionGateMiddleware:
    def __init__(self, app: ASGIApp, budget: BodyBudget, work_paths: tuple[str, ...], chunked_reserve: int):
        self.app, self.budget, self.work_paths, self.chunked_reserve = app, budget, work_paths, chunked_reserve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() else 0  # malformed: the body limit's 400
        else:
            size = self.chunked_reserve if "chunked" in headers.get("transfer-encoding", "") else 0
        admission: Admission | None = getattr(scope["app"].state, "admission", None)
        if scope["path"] in self.work_paths and admission is not None:
            refused = admission.refusal()
            if refused is not None:
                reason, message = refused
                admission.metrics.shed.labels(reason).inc()
                await self._refuse(message, size, scope, receive, send)
                return
        if not self.budget.reserve(size):
            message = (f"the server holds {self.budget.used} bytes of request bodies (limit {self.budget.limit}); "
                       "retry shortly")
            await self._refuse(message, size, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.budget.release(size)

    @staticmethod
    async def _refuse(message: str, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        error = Overloaded(message)
        headers = dict(error.headers or {})
        if size > CLOSE_ABOVE:
            headers["Connection"] = "close"
        await error_response(503, error.code, error.message, headers=headers)(scope, receive, send)
