"""POST /retrieve: JSON (base64 images) or multipart (image files + form fields), one response shape."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from app.api.deps import AdaptersDep, EngineDep, MetricsDep, SettingsDep
from app.core.errors import InvalidInput, UnsupportedMedia
from app.schemas import RetrieveJSON, RetrieveOptions, RetrieveResponse
from app.services.retrieval import RetrievalInput, decode_base64, retrieve

router = APIRouter(tags=["retrieval"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images", "texts"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "texts": {"type": "array", "items": {"type": "string"}},
        **{name: {"type": "string"} for name in ("description", "adapter_id", "strategy")},
        **{name: {"type": "integer"} for name in ("k", "seed", "top_k")},
        "tau": {"type": "number"},
    },
}
_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RetrieveJSON.model_json_schema()},
    "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
}}}


def _input(options: RetrieveOptions, images: list[tuple[str, bytes]]) -> RetrievalInput:
    return RetrievalInput(images=images, texts=options.texts, description=options.description,
                          adapter_id=options.adapter_id, strategy=options.strategy, k=options.k, tau=options.tau,
                          seed=options.seed, top_k=options.top_k)


async def _from_json(request: Request, settings) -> RetrievalInput:
    body = RetrieveJSON.model_validate_json(await request.body())  # ValidationError -> 400/422 with the field
    if len(body.images) > settings.max_images:  # before decoding any of them
        raise InvalidInput(f"{len(body.images)} images; the limit is {settings.max_images}", "images")
    return _input(body, [(f"images[{i}]", decode_base64(s, f"images[{i}]")) for i, s in enumerate(body.images)])


async def _from_multipart(request: Request, settings) -> RetrievalInput:
    # Generous parser limits (the body limit bounds the total); the exact per-field limits are checked after,
    # so that they are reported like every other field error.
    form = await request.form(max_files=4 * settings.max_images, max_fields=4 * settings.max_texts + 16)
    try:
        images = []
        for i, item in enumerate(form.getlist("images")):
            if not isinstance(item, UploadFile):
                raise InvalidInput("images must be file uploads (-F images=@photo.jpg)", f"images[{i}]")
            images.append((f"images[{i}]", await item.read()))
        fields = {key: form.getlist(key)[-1] for key in form.keys() if key not in ("images", "texts")}
        options = RetrieveOptions.model_validate(fields | {"texts": form.getlist("texts")})
    finally:
        await form.close()
    return _input(options, images)


@router.post("/retrieve", response_model=RetrieveResponse, openapi_extra=_OPENAPI)
async def retrieve_route(request: Request, engine: EngineDep, adapters: AdaptersDep, settings: SettingsDep,
                         metrics: MetricsDep) -> RetrieveResponse:
    """Rank texts for each image and images for each text, zero-shot or with an adapter given by a description
    (generated through the cache) or by adapter_id."""
    content_type = request.headers.get("content-type", "application/json").lower()
    if content_type.startswith("multipart/form-data"):
        inp = await _from_multipart(request, settings)
    elif content_type.startswith("application/json"):
        inp = await _from_json(request, settings)
    else:
        raise UnsupportedMedia(f"content type {content_type!r}: send application/json or multipart/form-data",
                               "content-type")
    return await retrieve(inp, engine, adapters, settings, metrics)
