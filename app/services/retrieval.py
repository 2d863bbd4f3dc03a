"""/retrieve: decode and check the inputs, pick the adapter (description / adapter_id / none), rank.

Images are checked before their pixels are decoded: PIL's `Image.open` only reads the header, so the format
and the size are known first; pixel decoding happens only for JPEG, PNG or WebP within the pixel cap.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from app.core.errors import InvalidInput, UnsupportedMedia
from app.core.metrics import Metrics
from app.schemas import AdapterUsed, ImageRanking, Ranked, RetrieveResponse, TextRanking
from app.services.adapters import AdapterService
from app.services.engine import Engine
from app.services.generator import resolve_params

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


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


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image, or a 4xx naming `field`: not an image (422), another format (415), too many pixels
    (422, checked from the header before any pixel is decoded)."""
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
    try:
        image.load()  # the pixels, now known to be few enough
        return image.convert("RGB")
    except Exception as e:  # truncated or corrupt data (OSError, SyntaxError, ValueError, ...)
        raise InvalidInput(f"image data is corrupt or truncated: {e}", field) from e


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


def check_counts(inp: RetrievalInput, settings) -> None:
    if inp.description is not None and inp.adapter_id is not None:
        raise InvalidInput("give either description or adapter_id, not both", "adapter_id")
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


async def retrieve(inp: RetrievalInput, engine: Engine, adapters: AdapterService, settings,
                   metrics: Metrics) -> RetrieveResponse:
    check_counts(inp, settings)
    params = None
    if inp.description is not None:  # check generation parameters before any expensive work
        params = resolve_params(description=inp.description, strategy=inp.strategy or settings.default_strategy,
                                k=inp.k, tau=inp.tau, seed=inp.seed, num_samples=1, settings=settings,
                                library_size=engine.library_size)
    images = await run_in_threadpool(
        lambda: [open_image(data, field, settings.max_image_pixels) for field, data in inp.images])

    if params is not None:
        adapter, status = await adapters.generate(params)
        used = AdapterUsed(source="description", adapter_id=adapter.adapter_id, cache=status,
                           strategy=adapter.metadata.get("strategy"), max_similarity=adapter.max_similarity)
    elif inp.adapter_id is not None:
        adapter = await adapters.fetch(inp.adapter_id)
        used = AdapterUsed(source="adapter_id", adapter_id=adapter.adapter_id,
                           strategy=adapter.metadata.get("strategy"), max_similarity=adapter.max_similarity)
    else:
        adapter, used = None, AdapterUsed(source="zero_shot")

    top_k = inp.top_k or max(len(images), len(inp.texts))
    vector = adapter.vector if adapter is not None else None
    t0 = time.perf_counter()
    ranking = await run_in_threadpool(engine.retrieve, vector, images, inp.texts, top_k)
    metrics.retrieval_seconds.labels(used.source).observe(time.perf_counter() - t0)
    return RetrieveResponse(
        adapter=used,
        images=[ImageRanking(index=i, texts=[Ranked(index=j, score=s) for j, s in row])
                for i, row in enumerate(ranking.image_to_text)],
        texts=[TextRanking(index=j, images=[Ranked(index=i, score=s) for i, s in row])
               for j, row in enumerate(ranking.text_to_image)],
    )
