"""/retrieve: decode and check the inputs, pick the adapter (description / adapter_id / none), rank.

Cost per request is bounded before it is paid:
  * the whole request runs in one admission slot (`app.services.admission`): parsing the body and base64
    (`read`, given by the route) happens there too, off the event loop; with micro-batching the encodings run
    in the batch's slot instead (a batch is one unit of work), after this request has given its own back;
  * every image's header is read first (`Image.open` reads no pixels), so a format, a per-image pixel cap or the
    per-request pixel budget (`max_request_pixels`) is refused before any pixel is decoded;
  * images are then decoded one at a time in the bounded decode pool, shrunk early to about twice the model's
    input size (JPEG decodes at reduced scale; other formats are reduced right after decoding) and turned into
    model input at once, so a request holds one full-size image at a time, never all of them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

from app.core.errors import ClientGone, InvalidInput, UnsupportedMedia
from app.core.memory import give_back
from app.core.metrics import Metrics
from app.services.admission import Admission, Slot
from app.services.batching import MicroBatcher
from app.services.engine import Engine, Ranking
from app.services.generator import AdapterFile, resolve_params

if TYPE_CHECKING:  # annotations only: app.services.fewshot (imported by adapters) builds on this module
    from app.services.adapters import AdapterService
    from app.services.fewshot import FewShotRequest

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")  # the same formats, as the API documents them
TRIM_AFTER_PIXELS = 16 * 1024 * 1024  # a request that decoded more hands free heap pages back (app.core.memory)


def decode_base64(text: str, field: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidInput("data URL must be base64-encoded (data:image/png;base64,...)", field)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"not valid base64: {e}", field) from e
    if not data:
        raise InvalidInput("empty image", field)
    return data


def open_header(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Bytes -> an image whose header is read and no pixel decoded, or a 4xx naming `field`: not an image (422),
    another format (415), too many pixels for one image (422)."""
    # PIL's own decompression-bomb guard raises above 2 x Image.MAX_IMAGE_PIXELS while reading the header.
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # header only
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"image is too large to decode safely ({e})", field) from e
    except UnidentifiedImageError:
        raise _not_allowed(data, field) from None
    except Exception as e:  # a recognised but broken header
        raise InvalidInput(f"image header cannot be read: {e}", field) from e
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", field)
    return image


def check_pixel_budget(images: list[tuple[str, bytes]], max_pixels: int, budget: int) -> int:
    """Every header, then the request's total, before a single pixel is decoded. -> pixels to decode."""
    total = 0
    for field, data in images:
        width, height = open_header(data, field, max_pixels).size
        total += width * height
    if total > budget:
        raise InvalidInput(f"the images hold {total} pixels in all; the per-request budget "
                           f"(SGLORA_MAX_REQUEST_PIXELS) is {budget}: send fewer or smaller images", "images")
    return total


def open_image(data: bytes, field: str, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Bytes -> decoded RGB image (4xx as `open_header`). With `min_side`, shrunk early so that its shorter side
    stays >= min_side: JPEG decodes at reduced scale (`draft`), other formats are reduced by an integer factor."""
    image = open_header(data, field, max_pixels)
    try:
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", _size_with_short_side(image.size, min_side))
        image.load()  # the pixels, now known to be few enough
        if min_side is not None and (factor := min(image.size) // min_side) > 1:
            image = image.reduce(factor)
        return image.convert("RGB")
    except Exception as e:  # truncated or corrupt data (OSError, SyntaxError, ValueError, ...)
        raise InvalidInput(f"image data is corrupt or truncated: {e}", field) from e


def _size_with_short_side(size: tuple[int, int], short: int) -> tuple[int, int]:
    width, height = size
    scale = short / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _not_allowed(data: bytes, field: str) -> Exception:
    """Tell an image in a format we do not take (415) from bytes that are no image at all (422)."""
    try:
        fmt = Image.open(io.BytesIO(data)).format  # header only, never decoded
    except Exception:
        return InvalidInput("not an image (JPEG, PNG or WebP expected)", field)
    return UnsupportedMedia(f"image format {fmt} is not accepted; send JPEG, PNG or WebP", field)


@dataclass
class RetrievalInput:
    images: list[tuple[str, bytes]]  # (field name for errors, raw bytes)
    texts: list[str]
    description: str | None
    adapter_id: str | None
    strategy: str | None
    k: int | None
    tau: float | None
    seed: int
    top_k: int | None
    gate: bool = True
    fewshot: FewShotRequest | None = None  # examples to refine the description's adapter on (checked, hashed)


def check_counts(inp: RetrievalInput, settings) -> None:
    if inp.description is not None and inp.adapter_id is not None:
        raise InvalidInput("give either description or adapter_id, not both", "adapter_id")
    if inp.fewshot is not None and inp.description is None:
        raise InvalidInput("examples refine the adapter generated for a description: give description too",
                           "examples")
    if not inp.images:
        raise InvalidInput("at least one image is required", "images")
    if len(inp.images) > settings.max_images:
        raise InvalidInput(f"{len(inp.images)} images; the limit is {settings.max_images}", "images")
    if not inp.texts:
        raise InvalidInput("at least one text is required", "texts")
    if len(inp.texts) > settings.max_texts:
        raise InvalidInput(f"{len(inp.texts)} texts; the limit is {settings.max_texts}", "texts")
    for i, text in enumerate(inp.texts):
        if len(text) > settings.max_text_chars:
            raise InvalidInput(f"text has {len(text)} characters; the limit is {settings.max_text_chars}",
                               f"texts[{i}]")


@dataclass(frozen=True)
class AdapterChoice:
    """Which adapter a retrieval used (None fields for zero-shot)."""

    source: str  # "zero_shot" | "description" | "adapter_id"
    adapter: AdapterFile | None = None
    cache: str | None = None
    downloadable: bool | None = None


@dataclass(frozen=True)
class Retrieval:
    adapter: AdapterChoice
    ranking: Ranking
    store_version: str  # the version whose adapter was used (zero-shot: the version served when it came in)


def prepare_image(engine: Engine, data: bytes, field: str, max_pixels: int) -> torch.Tensor:
    """Blocking: bytes -> model input [3, H, W]; the decoded image is dropped before the next one is decoded."""
    image = open_image(data, field, max_pixels, min_side=2 * engine.backbone.image_size)
    return engine.preprocess(image)


async def choose_adapter(inp: RetrievalInput, params, adapters: AdapterService, slot: Slot) -> AdapterChoice:
    if params is not None:
        generated = await adapters.generate(params, slot=slot)
        return AdapterChoice("description", generated.adapter, generated.cache, generated.stored)
    if inp.adapter_id is not None:
        return AdapterChoice("adapter_id", await adapters.fetch(inp.adapter_id), downloadable=True)
    return AdapterChoice("zero_shot")


async def rank_batched(engine: Engine, batcher: MicroBatcher, adapter: torch.Tensor | None, pixels: torch.Tensor,
                       texts: list[str], top_k: int) -> Ranking:
    """Embed micro-batched with other requests (the batch holds the model-work slot, not this request), then
    rank (a small matrix product and sorts, off the event loop)."""
    image_emb, text_emb = await asyncio.gather(batcher.encode("image", pixels, adapter),
                                               batcher.encode("text", texts, adapter))
    return await asyncio.to_thread(engine.rank, image_emb, text_emb, top_k)


async def retrieve(read: Callable[[], RetrievalInput], engine: Engine, adapters: AdapterService,
                   admission: Admission, settings, metrics: Metrics,
                   disconnected: Callable[[], Awaitable[bool]] | None = None) -> Retrieval:
    """`read` parses the request body (blocking; run off the event loop, inside the slot)."""
    served_version = engine.version
    async with admission.slot(disconnected) as slot:
        inp = await slot.run(read, decode=True)
        check_counts(inp, settings)
        params = None
        if inp.description is not None:  # check generation parameters before any expensive work
            params = resolve_params(description=inp.description, strategy=inp.strategy,
                                    k=inp.k, tau=inp.tau, seed=inp.seed, num_samples=1, settings=settings,
                                    store=engine.store, gate=inp.gate, fewshot=inp.fewshot)
        decoded = await slot.run(check_pixel_budget, inp.images, settings.max_image_pixels,
                                 settings.max_request_pixels, decode=True)
        pixels = torch.stack([await slot.run(prepare_image, engine, data, field, settings.max_image_pixels,
                                             decode=True)
                              for field, data in inp.images])  # [N, 3, H, W]
        choice = await choose_adapter(inp, params, adapters, slot)
        top_k = inp.top_k or max(len(pixels), len(inp.texts))
        vector = choice.adapter.vector if choice.adapter is not None else None
        if decoded > TRIM_AFTER_PIXELS:
            await slot.run(give_back, decode=True)
        t0 = time.perf_counter()
        if adapters.batcher is None:  # one forward per tower, in this request's slot
            ranking = await slot.run(engine.retrieve, vector, pixels, list(inp.texts), top_k)
    if adapters.batcher is not None:  # the slot is given back: the batch will hold one for all its requests
        if disconnected is not None and await disconnected():
            metrics.work_cancelled.labels("encode").inc()
            raise ClientGone()
        ranking = await rank_batched(engine, adapters.batcher, vector, pixels, list(inp.texts), top_k)
    metrics.retrieval_seconds.labels(choice.source).observe(time.perf_counter() - t0)
    version = choice.adapter.metadata.get("store_version", served_version) if choice.adapter else served_version
    return Retrieval(choice, ranking, version)
