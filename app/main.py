"""The FastAPI application.

`create_app(settings)` builds an app; the model is loaded in its lifespan (or behind it, with
SGLORA_LOAD_IN_BACKGROUND=true, while /health/ready answers 503). `app.main:app` is created on first access
(PEP 562 module __getattr__), so importing this module never reads the environment, and
`uvicorn app.main:app` needs no --factory. Invalid settings end start-up with one message per bad variable.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.deps import require_admin_key, require_api_key
from app.api.examples import add_openapi_examples
from app.api.gate import AdmissionGateMiddleware
from app.api.openapi import install_openapi
from app.api.routes import admin, experts, generate, health, retrieve
from app.core.config import Settings
from app.core.errors import install_error_handlers
from app.core.lifecycle import Lifecycle
from app.core.logging import configure_logging
from app.core.loop_lag import watch_loop_lag
from app.core.memory import limit_arenas
from app.core.metrics import Metrics
from app.core.middleware import BodyLimitMiddleware, DeadlineMiddleware, RequestMiddleware
from app.ml.threads import threads_per_slot, use_threads
from app.services.adapters import AdapterService
from app.services.admission import Admission, BodyBudget
from app.services.batching import MicroBatcher
from app.services.cache import make_cache
from app.services.engine import Engine

logger = logging.getLogger(__name__)
PLAYGROUND_DIR = Path(__file__).parent / "static" / "playground"
WORK_PATHS = ("/retrieve",)  # routes that always need model work: refused from their headers when admission would
EXPOSED_HEADERS = ["X-Adapter-Id", "X-Sample-Adapter-Ids", "X-Adapter-Downloadable", "X-Cache", "X-Coverage",
                   "X-Coverage-Warning", "X-Request-ID", "Retry-After", "X-Store-Version",
                   "Content-Disposition"]


def load_settings() -> Settings:
    """Settings from the environment, or SystemExit naming each bad SGLORA_* variable."""
    try:
        return Settings()
    except ValidationError as e:
        lines = [f"  SGLORA_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors()]
        raise SystemExit("sglora: invalid settings, the service cannot start:\n" + "\n".join(lines)) from None


async def _load(engine: Engine, metrics: Metrics) -> None:
    await run_in_threadpool(engine.load)
    metrics.ready.set(1)


async def _watch_store(engine: Engine, interval_s: float) -> None:
    """SGLORA_STORE_WATCH_S > 0: follow the store's version pointer; a version that fails to load is logged and
    the served one stays (Engine.reload_if_changed)."""
    while True:
        await asyncio.sleep(interval_s)
        if engine.ready:
            await run_in_threadpool(engine.reload_if_changed)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.log_level, settings.log_json)
    limit_arenas(settings.malloc_arenas)
    metrics = Metrics()
    engine = Engine(settings.store_path, settings.device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The cache (its Redis connections) belongs to the serving event loop: made here, closed at shutdown.
        cache = make_cache(settings, metrics)
        work_threads = threads_per_slot(settings.work_threads, settings.max_concurrent_work)
        admission = Admission(settings.max_concurrent_work, settings.max_queued_work, settings.queue_wait_s,
                              settings.decode_workers, metrics, partial(use_threads, work_threads))
        batcher = None
        if settings.batch_window_ms > 0:
            batcher = MicroBatcher(engine, settings.batch_window_ms / 1000, settings.batch_max_items,
                                   settings.batch_max_queue, metrics, admission)
        app.state.cache, app.state.admission = cache, admission
        app.state.adapters = AdapterService(engine, cache, metrics, admission, batcher)
        loader = None
        if settings.load_in_background:
            loader = asyncio.create_task(_load(engine, metrics))
            loader.add_done_callback(
                lambda t: t.cancelled() or t.exception() is None
                or logger.error("model failed to load: %s", t.exception()))
        else:
            await _load(engine, metrics)  # a bad store ends start-up here, loudly
        watcher = asyncio.create_task(_watch_store(engine, settings.store_watch_s)) if settings.store_watch_s else None
        lag = asyncio.create_task(watch_loop_lag(metrics))
        try:
            yield
        finally:
            for task in (loader, watcher, lag):
                if task is not None and not task.done():
                    task.cancel()
            await cache.close()
            admission.close()
            if batcher is not None:
                batcher.close()

    app = FastAPI(title="sglora", version="0.1.0", lifespan=lifespan,
                  description="SG-LoRA as a service: a one-line task description in, a CLIP LoRA adapter out.",
                  generate_unique_id_function=lambda route: route.name)  # stable operation ids: the route names
    install_openapi(app)
    app.state.settings, app.state.metrics, app.state.engine = settings, metrics, engine
    app.state.lifecycle = Lifecycle()
    install_error_handlers(app)

    # add_middleware wraps: the last added is outermost (metrics and the access log see every response).
    app.add_middleware(DeadlineMiddleware, seconds=settings.request_deadline_s, metrics=metrics)
    # Before any body is read: refuse what admission would refuse anyway, and bodies over the global budget.
    app.add_middleware(AdmissionGateMiddleware, budget=BodyBudget(settings.body_budget_bytes, metrics),
                       work_paths=WORK_PATHS, chunked_reserve=settings.max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Accept", "X-API-Key", "X-Request-ID"],
                           expose_headers=EXPOSED_HEADERS)
    app.add_middleware(RequestMiddleware, metrics=metrics)

    protected = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(generate.router, dependencies=protected)
    app.include_router(retrieve.router, dependencies=protected)
    app.include_router(experts.router, dependencies=protected)
    app.include_router(admin.router, dependencies=[Depends(require_admin_key)])
    generated_openapi = app.openapi

    def openapi_with_examples() -> dict:
        return add_openapi_examples(generated_openapi())  # FastAPI caches the schema; filling it is idempotent

    app.openapi = openapi_with_examples
    if settings.playground:  # static page; the API calls it makes carry the key the user types in
        app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR, html=True), name="playground")
    return app


_app: FastAPI | None = None


def __getattr__(name: str):
    """`app.main.app`: the app for `uvicorn app.main:app`, built from the environment on first access."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
