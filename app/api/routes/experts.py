"""GET /experts: what the library holds, so users can judge whether their task is covered."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.api.deps import AdmissionDep, EngineDep, SettingsDep
from app.core.errors import InvalidInput
from app.schemas import ExpertsResponse
from app.services.generator import served_default_strategy

router = APIRouter(tags=["library"])


@router.get("/experts", response_model=ExpertsResponse)
async def experts(
    request: Request,
    engine: EngineDep,
    admission: AdmissionDep,
    settings: SettingsDep,
    q: Annotated[str | None, Query(description="a task description: returns the nearest experts with their "
                                               "cosine similarity, to check coverage before generating")] = None,
    offset: Annotated[int, Query(ge=0, description="page start (listing only)")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size; with q, how many nearest experts")] = 100,
) -> ExpertsResponse:
    """The library, a page at a time, or (with q) the experts nearest a description."""
    if q is not None and (not q.strip() or len(q) > settings.max_description_chars):
        raise InvalidInput(f"q must be 1 to {settings.max_description_chars} characters, not all blank", "q")
    if q is not None and "\x00" in q:
        raise InvalidInput("q contains a NUL character", "q")
    async with admission.slot(request.is_disconnected) as slot:  # ?q= runs the text encoder: admitted model work
        page = await slot.run(engine.experts_page, offset, limit, q)
    return ExpertsResponse(**page, default_strategy=served_default_strategy(settings, engine.store))
