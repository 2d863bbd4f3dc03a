"""Liveness, readiness, metrics. Open without an API key (probes and scrapers carry none)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import MetricsDep
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Health)
async def live(request: Request) -> Health:
    """200 while the process serves requests (even while the model loads)."""
    return Health(status="alive")


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(request: Request):
    """200 once the model is loaded and warm; 503 before. Does not depend on the cache (Redis may be down)."""
    engine = request.app.state.engine
    cache = getattr(request.app.state, "cache", None)
    body = Health(status="ready" if engine.ready else "loading",
                  store_version=engine.version if engine.ready else None,
                  cache_backend=cache.backend.name if cache is not None else None,
                  cache_degraded=cache.degraded if cache is not None else None,
                  detail=engine.load_error)
    return JSONResponse(body.model_dump(), status_code=200 if engine.ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
