"""The OpenAPI document: every error status each route can return, in the one error envelope, in one place.

FastAPI documents the 200s and a 422 in its own `{"detail": ...}` shape. The service answers errors in the
envelope of `app.core.errors` with statuses that depend on what a route takes, so they are declared here by
rule, for every route present when the document is built (routes added later inherit them):

  every route outside /health     401 (API key: declared only when the server has one), 503 (loading,
                                  overloaded, deadline, draining; Retry-After), 500 (a bug)
  a route with a request body     400 (malformed), 413 (over the body limit), 415 (content type), 422
  a route with query parameters   422
  a route with path parameters    404 (unknown id), 422
  /admin/*                        403 (admin routes switched off), 409 (the store version is refused)
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from app.schemas import NO_NUL_NOT_BLANK


class ErrorItem(BaseModel):
    field: str | None = Field(description='the input at fault ("images[2]", "k"), null for the body as a whole')
    message: str


class ErrorBody(BaseModel):
    status: int
    code: str = Field(description="machine-readable: invalid_input, malformed_body, not_found, overloaded, ...")
    field: str | None
    message: str
    details: list[ErrorItem] = Field(description="every problem found; field/message repeat the first")


class ErrorEnvelope(BaseModel):
    error: ErrorBody


_DESCRIPTIONS = {
    400: "the body is malformed (not JSON, bad Content-Length)",
    401: "missing or wrong API key, sent as X-API-Key or Authorization: Bearer (only when the server sets "
         "SGLORA_API_KEY); X-Admin-Key on /admin routes",
    403: "admin routes are switched off (the server has no SGLORA_ADMIN_KEY)",
    404: "unknown or expired id",
    409: "the store's new version cannot be served (corrupt, another base model); the served version stays",
    413: "the body is over the server's limit",
    415: "unsupported content type or image format",
    422: "a field's value is invalid; `field` names it",
    500: "a bug in the service (never for bad input)",
    503: "not ready, overloaded, past the request deadline or shutting down: retry after Retry-After seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_REQUEST_ID = {"X-Request-ID": {"description": "the request's id (the client's, when it sent a tame one)",
                                "schema": {"type": "string"}}}
API_KEY_SCHEMES = ("ApiKey", "BearerAuth")  # app.api.deps: the key as X-API-Key, or as Authorization: Bearer


def _error(status: int) -> dict:
    response = {"description": _DESCRIPTIONS[status], "headers": dict(_REQUEST_ID),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
    if status == 503:
        response["headers"] |= _RETRY_AFTER
    return response


def _statuses(path: str, operation: dict) -> set[int]:
    if path.startswith("/health"):
        return set()
    statuses = {500, 503}
    if operation.get("security"):
        statuses.add(401)
    if "requestBody" in operation:
        statuses |= {400, 413, 415, 422}
    kinds = {p.get("in") for p in operation.get("parameters", [])}
    if "query" in kinds or "header" in kinds:
        statuses.add(422)
    if "path" in kinds:
        statuses |= {404, 422}
    if path.startswith("/admin"):
        statuses |= {401, 403, 409}
    return statuses


def _constrain(prop: dict, **keywords) -> None:
    """Add keywords to a property's schema, or to each non-null branch of an Optional's anyOf."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(keywords)


def _settings_bounds(app: FastAPI, schema: dict) -> None:
    """Limits that depend on settings (and k on the loaded library): static pydantic models cannot state them,
    but a client (and schemathesis) should see them, so a request that fits the document fits the server."""
    settings, engine = app.state.settings, app.state.engine
    text = {"maxLength": settings.max_description_chars, "pattern": NO_NUL_NOT_BLANK}
    bounds = {
        "description": text,
        "num_samples": {"maximum": settings.max_num_samples},
        "images": {"maxItems": settings.max_images},
        "texts": {"maxItems": settings.max_texts, "items": {"type": "string", "maxLength": settings.max_text_chars,
                                                             "pattern": NO_NUL_NOT_BLANK}},
    }
    if engine.ready:
        bounds["k"] = {"maximum": engine.library_size}
    components = schema.get("components", {}).get("schemas", {})
    bodies = [media.get("schema", {}) for item in schema.get("paths", {}).values() for op in item.values()
              for media in op.get("requestBody", {}).get("content", {}).values()]  # request bodies only
    for model in bodies:
        if "$ref" in model:
            model = components.get(model["$ref"].rsplit("/", 1)[-1], {})
        for name, prop in model.get("properties", {}).items():
            if name in bounds:
                _constrain(prop, **bounds[name])
    for item in schema.get("paths", {}).values():  # ?q= takes a description: the same bounds
        for op in item.values():
            for param in op.get("parameters", []):
                if param.get("in") == "query" and param.get("name") == "q":
                    _constrain(param.get("schema", {}), minLength=1, **text)


def _security_when_configured(app: FastAPI, schema: dict) -> None:
    """The API key's schemes (X-API-Key, Bearer) are declared only when the server has a key: without one, no
    route asks for it (and none answers 401), so the document must not say it does."""
    if app.state.settings.api_key is not None:
        return
    for item in schema.get("paths", {}).values():
        for op in item.values():
            op["security"] = [s for s in op.get("security", []) if not set(s) & set(API_KEY_SCHEMES)]
            if not op["security"]:
                del op["security"]
    components = schema.get("components", {})
    for scheme in API_KEY_SCHEMES:
        components.get("securitySchemes", {}).pop(scheme, None)
    if not components.get("securitySchemes", True):
        del components["securitySchemes"]


def build_openapi(app: FastAPI) -> dict:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _settings_bounds(app, schema)
    _security_when_configured(app, schema)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
                      .pop("$defs", {}))
    components["ErrorEnvelope"] = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    components["ErrorEnvelope"].pop("$defs", None)
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape, which the service never sends
        components.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status in sorted(_statuses(path, operation)):
                responses[str(status)] = _error(status)  # replaces FastAPI's own 422
            for response in responses.values():
                response.setdefault("headers", {}).update(_REQUEST_ID)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Build the document on request (after every router is included); cached once the model is loaded, since
    the library's size bounds k."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = build_openapi(app)
            if not app.state.engine.ready:
                return document
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
