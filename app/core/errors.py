"""Domain errors and their HTTP statuses, in one place.

Every error response has one shape:

    {"error": {"status": 422, "code": "invalid_input", "field": "k", "message": "...",
               "details": [{"field": "k", "message": "..."}, ...]}}

`field` names the offending input (dotted/indexed, e.g. "images[2]", "texts", "description"), or null when
the problem is not one field's (e.g. the body as a whole). `details` lists every problem found (pydantic
may report several); `field`/`message` repeat the first.

Statuses: 400 malformed body, 401 API key, 403 admin routes switched off, 404 unknown route/adapter, 405 method,
409 a store version that cannot be switched to, 413 body over the limit,
415 image format / body content type, 422 invalid field values, 503 model not loaded yet / overloaded / past the
request deadline / out of accelerator memory / shutting down (with Retry-After), 500 only for bugs. A client
that went away gets nothing (its connection is gone); metrics and the access log record it as 499, never as a
5xx.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.ml.lora import LayoutMismatchError
from app.ml.strategies import StrategyUnavailable

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """A problem with the request (or the service's state) that the client should hear about."""

    code = "error"
    retry_after_s: int | None = None  # set on "try again later" errors: sent as Retry-After

    def __init__(self, message: str, field: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.field = message, field
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class InvalidInput(ServiceError):
    code = "invalid_input"


class MalformedBody(ServiceError):
    code = "malformed_body"


class UnsupportedMedia(ServiceError):
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class NotFound(ServiceError):
    code = "not_found"


class Unauthorized(ServiceError):
    code = "unauthorized"


class NotReady(ServiceError):
    code = "not_ready"
    retry_after_s = 5


class Forbidden(ServiceError):
    code = "forbidden"


class Conflict(ServiceError):
    """The request is fine but the service's state refuses it (e.g. a store version that cannot be served)."""

    code = "conflict"


class Overloaded(ServiceError):
    """Every model-work slot is busy and the bounded wait queue is full (or the wait ran out)."""

    code = "overloaded"
    retry_after_s = 1


class OutOfMemory(ServiceError):
    """The accelerator ran out of memory for this request: it is shed (its memory freed), the server goes on."""

    code = "out_of_memory"
    retry_after_s = 1


class CacheUnavailable(ServiceError):
    """Redis cannot say whether an adapter id is stored (it is down): not a 404, which would be a lie."""

    code = "cache_unavailable"
    retry_after_s = 2


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"
    retry_after_s = 1


class ClientGone(Exception):
    """The client disconnected; the rest of its work is dropped (at the next safe point). Nobody is left to
    answer."""


CLIENT_CLOSED = 499  # nginx's convention for "client closed the request": recorded, never sent


# THE mapping from domain errors to statuses. Subclasses inherit their parent's status (first match in MRO).
STATUS: dict[type[Exception], int] = {
    MalformedBody: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMedia: 415,
    InvalidInput: 422,
    StrategyUnavailable: 422,  # a known strategy this store cannot serve (no CVAE)
    LayoutMismatchError: 422,  # an adapter that does not fit the served model
    NotReady: 503,
    Overloaded: 503,
    OutOfMemory: 503,
    DeadlineExceeded: 503,
    CacheUnavailable: 503,
}
FIELD_OF = {StrategyUnavailable: "strategy", LayoutMismatchError: "adapter_id"}
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_input",
              503: "unavailable"}


def status_of(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(status: int, code: str, message: str, field: str | None = None,
               details: list[dict] | None = None) -> dict:
    return {"error": {"status": status, "code": code, "field": field, "message": message,
                      "details": details if details is not None else [{"field": field, "message": message}]}}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   details: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, field, details), status_code=status, headers=headers)


def field_of_loc(loc: tuple | list) -> str | None:
    """pydantic location ("body", "images", 3) -> "images[3]"; the "body"/"query" root is dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_details(errors: list[dict]) -> list[dict]:
    details = []
    for e in errors:
        message = e.get("msg", "invalid value")
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        details.append({"field": field_of_loc(e.get("loc", ())), "message": message})
    return details


def validation_response(errors: list[dict]) -> JSONResponse:
    invalid_json = [e for e in errors if e.get("type") == "json_invalid"]
    if invalid_json:  # its location is a character offset in the body, not a field
        error = invalid_json[0]
        offsets = [p for p in error.get("loc", ()) if isinstance(p, int)]
        where = f" at character {offsets[-1]}" if offsets else ""
        message = f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}{where}"
        return error_response(400, "malformed_body", message)
    details = validation_details(errors)
    first = details[0] if details else {"field": None, "message": "invalid request"}
    return error_response(422, "invalid_input", first["message"], first["field"], details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "ApiKey"} if isinstance(exc, Unauthorized) else exc.headers
        return error_response(status_of(exc), exc.code, exc.message, exc.field, headers=headers)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: Exception) -> Response:
        # The connection is closed: this response is never delivered; its status is what metrics record.
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StrategyUnavailable)
    @app.exception_handler(LayoutMismatchError)
    async def _ml_error(request: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        return error_response(status, HTTP_CODES[status], str(exc), FIELD_OF.get(type(exc)))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _model_validation(request: Request, exc: ValidationError) -> JSONResponse:
        # Raised when a route validates a body itself (the /retrieve JSON and multipart variants).
        return validation_response(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
