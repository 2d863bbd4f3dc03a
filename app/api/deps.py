"""Dependencies, injected with Annotated: routes declare what they need and never reach into app.state.

Each is `async def` although it only reads app.state: FastAPI runs a plain `def` dependency in its thread pool, a
thread hand-off per dependency per request (five on /generate-lora) that under a few hundred connections queues on
the pool's 40 threads and the GIL, and made even a refusal cost milliseconds."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import Settings
from app.core.errors import Forbidden, NotReady, Unauthorized
from app.core.metrics import Metrics
from app.services.adapters import AdapterService
from app.services.admission import Admission
from app.services.cache import Cache
from app.services.engine import Engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_engine(request: Request) -> Engine:
    """The loaded engine; 503 while it is still loading (routes that need the model fail fast, not hang)."""
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise NotReady(engine.public_detail)
    return engine


async def get_cache(request: Request) -> Cache:
    return request.app.state.cache


async def get_adapters(request: Request, engine: Annotated[Engine, Depends(get_engine)]) -> AdapterService:
    return request.app.state.adapters


async def get_admission(request: Request) -> Admission:
    return request.app.state.admission


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
CacheDep = Annotated[Cache, Depends(get_cache)]
AdaptersDep = Annotated[AdapterService, Depends(get_adapters)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]


# auto_error=False: the check below answers in the service's error envelope (and skips when no key is set).
# Two documented ways to send the one key (OpenAPI: either scheme satisfies a route): the X-API-Key header, or
# `Authorization: Bearer <key>` as OpenAI-style and Hugging Face clients send it.
_API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                        description="required when the server sets SGLORA_API_KEY")
_BEARER = HTTPBearer(scheme_name="BearerAuth", auto_error=False,
                     description="the same key as `Authorization: Bearer <key>` (an alternative to X-API-Key)")


async def require_api_key(settings: SettingsDep, x_api_key: Annotated[str | None, Security(_API_KEY)] = None,
                          bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if x_api_key is not None:
        if not hmac.compare_digest(x_api_key.encode(), expected):
            raise Unauthorized("wrong API key", "X-API-Key")
        return
    if bearer is None:
        raise Unauthorized("missing API key: send it as X-API-Key or Authorization: Bearer <key>", "X-API-Key")
    if not hmac.compare_digest(bearer.credentials.encode(), expected):
        raise Unauthorized("wrong API key", "Authorization")


_ADMIN_KEY = APIKeyHeader(name="X-Admin-Key", scheme_name="AdminKey", auto_error=False,
                          description="the server's SGLORA_ADMIN_KEY (admin routes are off without one)")


async def require_admin_key(settings: SettingsDep,
                            x_admin_key: Annotated[str | None, Security(_ADMIN_KEY)] = None) -> None:
    if settings.admin_key is None:
        raise Forbidden("admin routes are switched off: start the server with SGLORA_ADMIN_KEY set")
    if x_admin_key is None:
        raise Unauthorized("missing X-Admin-Key header", "X-Admin-Key")
    if not hmac.compare_digest(x_admin_key.encode(), settings.admin_key.get_secret_value().encode()):
        raise Unauthorized("wrong admin key", "X-Admin-Key")
