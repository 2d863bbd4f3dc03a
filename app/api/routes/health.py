"""Liveness, readiness, metrics. Open without an API key (probes and scrapers carry none)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import MetricsDep
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Health, responses={503: {"model": Health}},
            operation_id="health_live")
async def live(request: Request):
    """200 while the process serves requests (even while the model loads); 503 once a background load has
    failed, so that the orchestrator restarts the process instead of waiting for ever."""
    engine = request.app.state.engine
    if engine.state == "failed":
        return JSONResponse(Health(status="failed", detail=engine.public_detail).model_dump(), status_code=503)
    return Health(status="alive")


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}},
            operation_id="health_ready")
async def ready(request: Request):
    """200 once the model is loaded and warm; 503 while loading, after a failed load, and from the moment the
    server is told to shut down (draining). Does not depend on the cache (Redis may be down)."""
    engine, lifecycle = request.app.state.engine, request.app.state.lifecycle
    cache = getattr(request.app.state, "cache", None)
    status = "draining" if lifecycle.draining else engine.state
    body = Health(status=status,
                  store_version=engine.version if engine.ready else None,
                  cache_backend=cache.backend.name if cache is not None else None,
                  cache_degraded=cache.degraded if cache is not None else None,
                  detail=None if engine.ready else engine.public_detail)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
