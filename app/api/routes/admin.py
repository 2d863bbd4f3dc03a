"""POST /admin/reload: switch to the store version its pointer names now, without a restart."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep
from app.core.errors import Conflict
from app.ml.store import StoreError
from app.schemas import ReloadResponse

router = APIRouter(tags=["admin"], prefix="/admin")


@router.post("/reload", response_model=ReloadResponse, name="reload_store")
async def reload(engine: EngineDep) -> ReloadResponse:
    """Load the store's current version beside the served one, warm it up, then switch. Requests in flight finish on
    the version they started with; readiness stays 200. A version that fails to load is refused (409) and the
    served one stays."""
    try:
        return ReloadResponse(**await run_in_threadpool(engine.reload))
    except StoreError as e:
        raise Conflict(f"store not switched, still serving {engine.version}: {e}", "store") from e
