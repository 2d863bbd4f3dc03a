"""POST /generate-lora and GET /adapters/{adapter_id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import AdaptersDep, EngineDep, SettingsDep
from app.schemas import Coverage, GenerateRequest, GenerateResponse
from app.services.generator import AdapterFile, resolve_params

router = APIRouter(tags=["adapters"])

_FILE_RESPONSE = {200: {"content": {"application/octet-stream": {}, "application/json": {}},
                        "description": "the adapter as safetensors (default) or, with Accept: application/json, "
                                       "its id, trace and coverage"}}


def wants_json(request: Request) -> bool:
    """Accept negotiation between the file (default) and JSON: whichever of the two is listed first."""
    accept = request.headers.get("accept", "").lower()
    json_at, file_at = accept.find("application/json"), accept.find("application/octet-stream")
    return json_at >= 0 and (file_at < 0 or json_at < file_at)


def coverage_of(adapter: AdapterFile, threshold: float) -> Coverage:
    sim = adapter.max_similarity
    warning = None
    if sim is not None and sim < threshold:
        warning = (f"no expert in the library is close to this description (best cosine {sim:.3f} < {threshold}); "
                   "the adapter may not help")
    return Coverage(max_similarity=sim, threshold=threshold, warning=warning)


def adapter_headers(adapter: AdapterFile, coverage: Coverage, cache: str | None = None) -> dict[str, str]:
    headers = {
        "Content-Disposition": f'attachment; filename="{adapter.adapter_id}.safetensors"',
        "X-Adapter-Id": adapter.adapter_id,
        "X-Sample-Adapter-Ids": ",".join(adapter.adapter_ids),
        "X-Coverage": "none" if coverage.max_similarity is None else f"{coverage.max_similarity:.6f}",
    }
    if cache is not None:
        headers["X-Cache"] = cache
    if coverage.warning:
        headers["X-Coverage-Warning"] = coverage.warning
    return headers


def adapter_response(request: Request, adapter: AdapterFile, threshold: float, cache: str | None):
    coverage = coverage_of(adapter, threshold)
    headers = adapter_headers(adapter, coverage, cache)
    if wants_json(request):
        body = GenerateResponse(adapter_id=adapter.adapter_id, adapter_ids=adapter.adapter_ids,
                                download_url=str(request.url_for("download_adapter", adapter_id=adapter.adapter_id)),
                                cache=cache or "hit", strategy=adapter.metadata["strategy"], trace=adapter.trace,
                                coverage=coverage, metadata=adapter.metadata)
        del headers["Content-Disposition"]
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)
    return Response(adapter.data, media_type="application/octet-stream", headers=headers)


@router.post("/generate-lora", response_class=Response, responses=_FILE_RESPONSE)
async def generate_lora(body: GenerateRequest, request: Request, engine: EngineDep, adapters: AdaptersDep,
                        settings: SettingsDep) -> Response:
    """A task description in, a LoRA adapter out (safetensors; PEFT-style keys; provenance in its metadata)."""
    params = resolve_params(description=body.description, strategy=body.strategy or settings.default_strategy,
                            k=body.k, tau=body.tau, seed=body.seed, num_samples=body.num_samples,
                            settings=settings, library_size=engine.library_size)
    adapter, status = await adapters.generate(params)
    return adapter_response(request, adapter, settings.coverage_warning_below, status)


@router.get("/adapters/{adapter_id}", name="download_adapter", response_class=Response, responses=_FILE_RESPONSE)
async def download_adapter(adapter_id: str, request: Request, adapters: AdaptersDep,
                           settings: SettingsDep) -> Response:
    """A previously generated adapter, while it is stored (TTL); 404 once unknown or expired."""
    adapter = await adapters.fetch(adapter_id)
    return adapter_response(request, adapter, settings.coverage_warning_below, None)
