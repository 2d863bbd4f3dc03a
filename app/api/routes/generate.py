"""POST /generate-lora and GET /adapters/{adapter_id}."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.api.deps import AdaptersDep, EngineDep, SettingsDep
from app.schemas import Coverage, GenerateRequest, GenerateResponse
from app.services.adapters import AdapterService, Generated
from app.services.export import ExportFormat, download_urls
from app.services.fewshot import fewshot_request, from_base64
from app.services.generator import AdapterFile, resolve_params

router = APIRouter(tags=["adapters"])

_FILE_RESPONSE = {200: {"content": {"application/octet-stream": {}, "application/zip": {}, "application/json": {}},
                        "description": "the adapter as safetensors (default; format=peft: a zip of a PEFT folder; "
                                       "format=open_clip-merged: base weights with the adapter merged) or, with "
                                       "Accept: application/json, its id, trace, coverage and download URLs"}}
FormatQuery = Annotated[ExportFormat, Query(
    description="safetensors: the adapter (open_clip names); peft: zip of a PEFT adapter folder for Hugging Face "
                "CLIPModel; open_clip-merged: the store's base weights with the adapter merged (safetensors). "
                "With Accept: application/json the response lists a URL per format instead")]


def wants_json(request: Request) -> bool:
    """Accept negotiation between the file (default) and JSON: whichever of the two is listed first."""
    accept = request.headers.get("accept", "").lower()
    json_at, file_at = accept.find("application/json"), accept.find("application/octet-stream")
    return json_at >= 0 and (file_at < 0 or json_at < file_at)


def coverage_of(adapter: AdapterFile, threshold: float) -> Coverage:
    sim = adapter.coverage
    warning = None
    if adapter.gated:
        warning = f"served zero-shot (no adapter): {adapter.gated}; send \"gate\": false for the routed adapter"
    elif sim is not None and sim < threshold:
        warning = (f"no expert in the library is close to this description (best cosine {sim:.3f} < {threshold}); "
                   "the adapter may not help")
    return Coverage(max_similarity=sim, threshold=threshold, warning=warning)


def download_url(request: Request, settings, adapter_id: str) -> str:
    """Built from the configured public URL, never from the request's Host header (a client could set it)."""
    path = request.app.url_path_for("download_adapter", adapter_id=adapter_id)
    return (settings.public_url.rstrip("/") if settings.public_url else "") + path


def adapter_headers(adapter: AdapterFile, coverage: Coverage, cache: str | None, downloadable: bool) -> dict[str, str]:
    headers = {
        "Content-Disposition": f'attachment; filename="{adapter.adapter_id}.safetensors"',
        "X-Adapter-Id": adapter.adapter_id,
        "X-Sample-Adapter-Ids": ",".join(adapter.adapter_ids),
        "X-Adapter-Downloadable": "true" if downloadable else "false",
        "X-Coverage": "none" if coverage.max_similarity is None else f"{coverage.max_similarity:.6f}",
        "X-Store-Version": adapter.metadata.get("store_version", ""),  # the version that made this adapter
    }
    if cache is not None:
        headers["X-Cache"] = cache
    if coverage.warning:
        headers["X-Coverage-Warning"] = coverage.warning
    if adapter.gated:
        headers["X-Gated"] = "zero-shot"
    return headers


async def adapter_response(request: Request, adapters: AdapterService, settings, adapter: AdapterFile,
                           cache: str | None, downloadable: bool, fmt: str = "safetensors"):
    coverage = coverage_of(adapter, settings.coverage_warning_below)
    headers = adapter_headers(adapter, coverage, cache, downloadable)
    if wants_json(request):
        url = download_url(request, settings, adapter.adapter_id) if downloadable else None
        body = GenerateResponse(adapter_id=adapter.adapter_id, adapter_ids=adapter.adapter_ids,
                                downloadable=downloadable, download_url=url,
                                downloads=download_urls(url) if url else {}, cache=cache or "hit",
                                strategy=adapter.metadata["strategy"], served=adapter.served, trace=adapter.trace,
                                coverage=coverage, gated=adapter.gated, refinement=adapter.refinement,
                                metadata=adapter.metadata)
        del headers["Content-Disposition"]
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)
    export = await adapters.export(adapter, fmt, request.is_disconnected)
    headers["Content-Disposition"] = f'attachment; filename="{export.filename}"'
    return Response(export.data, media_type=export.media_type, headers=headers)


@router.post("/generate-lora", response_class=Response, responses=_FILE_RESPONSE)
async def generate_lora(body: GenerateRequest, request: Request, engine: EngineDep, adapters: AdaptersDep,
                        settings: SettingsDep, format: FormatQuery = "safetensors") -> Response:
    """A task description in, a LoRA adapter out (safetensors; PEFT-style keys; provenance in its metadata).
    With `examples`, the adapter is refined on them (the response's refinement says what they did)."""
    fewshot = None
    if body.examples:  # base64 and image headers: blocking work, off the event loop
        fewshot = await asyncio.to_thread(lambda: fewshot_request(from_base64(body.examples, settings), settings))
    params = resolve_params(description=body.description, strategy=body.strategy,
                            k=body.k, tau=body.tau, seed=body.seed, num_samples=body.num_samples,
                            settings=settings, store=engine.store, gate=body.gate, fewshot=fewshot)
    generated: Generated = await adapters.generate(params, disconnected=request.is_disconnected)
    return await adapter_response(request, adapters, settings, generated.adapter, generated.cache, generated.stored,
                                  format)


@router.get("/adapters/{adapter_id}", name="download_adapter", response_class=Response, responses=_FILE_RESPONSE)
async def download_adapter(adapter_id: str, request: Request, engine: EngineDep, adapters: AdaptersDep,
                           settings: SettingsDep, format: FormatQuery = "safetensors") -> Response:
    """A previously generated adapter, while it is stored (TTL); 404 once unknown or expired."""
    adapter = await adapters.fetch(adapter_id)
    return await adapter_response(request, adapters, settings, adapter, None, True, format)
