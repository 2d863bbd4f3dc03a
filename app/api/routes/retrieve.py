"""POST /retrieve: JSON (base64 images) or multipart (image files + form fields), one response shape."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from app.api.deps import AdaptersDep, AdmissionDep, EngineDep, MetricsDep, SettingsDep
from app.core.errors import InvalidInput, UnsupportedMedia
from app.schemas import AdapterUsed, ImageRanking, Ranked, RetrieveJSON, RetrieveOptions, RetrieveResponse, TextRanking
from app.services.fewshot import FewShotRequest, RawExample, check_count, fewshot_request, from_base64
from app.services.retrieval import IMAGE_MEDIA_TYPES, Retrieval, RetrievalInput, decode_base64, retrieve

router = APIRouter(tags=["retrieval"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images", "texts"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "image files: JPEG, PNG or WebP (another format is a 415)"},
        "texts": {"type": "array", "items": {"type": "string"}},
        "example_images": {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "few-shot examples' images, paired in order with example_captions"},
        "example_captions": {"type": "array", "items": {"type": "string"}},
        **{name: {"type": "string"} for name in ("description", "adapter_id", "strategy")},
        **{name: {"type": "integer"} for name in ("k", "seed", "top_k")},
        "tau": {"type": "number"},
    },
}
_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RetrieveJSON.model_json_schema()},
    "multipart/form-data": {"schema": _MULTIPART_SCHEMA,
                            "encoding": {name: {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}
                                         for name in ("images", "example_images")}},
}}}


def _input(options: RetrieveOptions, images: list[tuple[str, bytes]],
           fewshot: FewShotRequest | None = None) -> RetrievalInput:
    return RetrievalInput(images=images, texts=options.texts, description=options.description,
                          adapter_id=options.adapter_id, strategy=options.strategy, k=options.k, tau=options.tau,
                          seed=options.seed, top_k=options.top_k,
                          gate=options.gate, fewshot=fewshot)


def _from_json(held: list[bytearray], settings) -> RetrievalInput:
    """Blocking (JSON parsing, base64): the service runs it off the event loop. `held` is the request's only
    reference to its body; each copy is dropped as soon as the next form of it exists (raw -> strings ->
    bytes), so a large body is held about once, not three times."""
    body = RetrieveJSON.model_validate_json(held.pop())  # ValidationError -> 400/422 with the field
    if len(body.images) > settings.max_images:  # before decoding any of them
        raise InvalidInput(f"{len(body.images)} images; the limit is {settings.max_images}", "images")
    images = []
    for i in range(len(body.images)):
        images.append((f"images[{i}]", decode_base64(body.images[i], f"images[{i}]")))
        body.images[i] = ""
    fewshot = fewshot_request(from_base64(body.examples, settings), settings) if body.examples else None
    return _input(body, images, fewshot)


async def _receive_body(request: Request) -> bytearray:
    """The body in one buffer (Starlette's `body()` keeps its chunks and their join: twice the size)."""
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
    return buffer


async def _from_multipart(request: Request, settings) -> RetrievalInput:
    # Generous parser limits (the body limit bounds the total); the exact per-field limits are checked after,
    # so that they are reported like every other field error.
    form = await request.form(max_files=4 * (settings.max_images + settings.max_examples),
                              max_fields=4 * (settings.max_texts + settings.max_examples) + 16)
    try:
        images = []
        for i, item in enumerate(form.getlist("images")):
            if not isinstance(item, UploadFile):
                raise InvalidInput("images must be file uploads (-F images=@photo.jpg)", f"images[{i}]")
            images.append((f"images[{i}]", await item.read()))
        examples = await _multipart_examples(form, settings)
        fields = {key: form.getlist(key)[-1] for key in form.keys() if key not in _LISTS}
        if fields.get("gate") in ("true", "false"):  # form fields are text; the JSON schema's gate is a strict bool
            fields["gate"] = fields["gate"] == "true"
        options = RetrieveOptions.model_validate(fields | {"texts": form.getlist("texts")})
    finally:
        await form.close()
    return _input(options, images, fewshot_request(examples, settings) if examples else None)


_LISTS = ("images", "texts", "example_images", "example_captions")  # repeated form fields


async def _multipart_examples(form, settings) -> list[RawExample]:
    """example_images (files) paired in order with example_captions (text fields)."""
    files, captions = form.getlist("example_images"), form.getlist("example_captions")
    check_count(max(len(files), len(captions)), settings)
    if len(files) != len(captions):
        raise InvalidInput(f"{len(files)} example_images but {len(captions)} example_captions: send one caption "
                           "per image, in the same order", "example_captions")
    examples = []
    for i, (item, caption) in enumerate(zip(files, captions, strict=True)):
        if not isinstance(item, UploadFile):
            raise InvalidInput("example_images must be file uploads (-F example_images=@photo.jpg)",
                               f"examples[{i}].image")
        examples.append(RawExample(f"examples[{i}]", await item.read(), str(caption)))
    return examples


async def _reader(request: Request, settings) -> Callable[[], RetrievalInput]:
    """Receive the body (I/O, on the loop) and return the blocking parse the service runs in its slot."""
    content_type = request.headers.get("content-type", "application/json").lower()
    if content_type.startswith("multipart/form-data"):
        inp = await _from_multipart(request, settings)  # python-multipart parses while receiving
        return lambda: inp
    if content_type.startswith("application/json"):
        held = [await _receive_body(request)]
        return lambda: _from_json(held, settings)
    raise UnsupportedMedia(f"content type {content_type!r}: send application/json or multipart/form-data",
                           "content-type")


def _response(result: Retrieval) -> RetrieveResponse:
    choice, ranking = result.adapter, result.ranking
    adapter = choice.adapter
    used = AdapterUsed(source=choice.source, adapter_id=adapter.adapter_id if adapter else None,
                       downloadable=choice.downloadable, cache=choice.cache,
                       strategy=adapter.metadata.get("strategy") if adapter else None,
                       max_similarity=adapter.coverage if adapter else None,
                       gated=adapter.gated if adapter else None,
                       refinement=adapter.refinement if adapter else None)
    return RetrieveResponse(
        store_version=result.store_version,
        adapter=used,
        images=[ImageRanking(index=i, texts=[Ranked(index=j, score=s) for j, s in row])
                for i, row in enumerate(ranking.image_to_text)],
        texts=[TextRanking(index=j, images=[Ranked(index=i, score=s) for i, s in row])
               for j, row in enumerate(ranking.text_to_image)],
    )


@router.post("/retrieve", response_model=RetrieveResponse, openapi_extra=_OPENAPI, name="retrieve")
async def retrieve_route(request: Request, engine: EngineDep, adapters: AdaptersDep, admission: AdmissionDep,
                         settings: SettingsDep, metrics: MetricsDep) -> Response:
    """Rank texts for each image and images for each text, zero-shot or with an adapter given by a description
    (generated through the cache) or by adapter_id."""
    read = await _reader(request, settings)
    result = await retrieve(read, engine, adapters, admission, settings, metrics, request.is_disconnected)
    # N images x M texts of rankings: serialised off the event loop (the model documents the shape).
    body = await asyncio.to_thread(lambda: _response(result).model_dump_json())
    return Response(body, media_type="application/json")
