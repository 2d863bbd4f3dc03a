"""GET /experts: what the library holds, so users can judge whether their task is covered."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import EngineDep
from app.schemas import ExpertsResponse

router = APIRouter(tags=["library"])


@router.get("/experts", response_model=ExpertsResponse)
async def experts(engine: EngineDep) -> ExpertsResponse:
    items = engine.experts()
    cvae = engine.store.cvae.info if engine.store.cvae is not None else None
    return ExpertsResponse(store_version=engine.version, count=len(items), experts=items, cvae=cvae)
