"""A request's few-shot examples: checked, hashed and decoded; refinement itself is app/ml/fewshot.py.

Examples are image-caption pairs sent with /generate-lora or with /retrieve's description (base64 JSON, or
multipart files `example_images` + form fields `example_captions` on /retrieve). Their limits are /retrieve's:
`max_image_pixels` per image and `max_request_pixels` for the request (the examples' pixels plus, on /retrieve, the
images it ranks), checked on headers before any pixel is decoded; at most `max_examples` of them, captions at most
`max_text_chars`. Every refusal is a 4xx naming the field (`examples`, `examples[2].image`,
`examples[0].caption`) and happens before the cache is looked at, so a refused request never leaves an entry (an
image whose header reads but whose data is corrupt is found while decoding, on a miss: the generation then fails
with that 4xx and nothing is cached). Fewer than FewShotConfig.min_examples (4) are accepted and change nothing:
the response's refinement says there were too few to hold any out.

The cache key holds the examples' sha256 (`examples_sha256`): their image bytes and captions, in order. The adapter's
metadata records that hash and their count, never the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from app.core.errors import InvalidInput
from app.ml.fewshot import Examples, FewShotConfig
from app.services.engine import Engine
from app.services.retrieval import check_pixel_budget, decode_base64, prepare_image


@dataclass(frozen=True)
class RawExample:
    field: str  # "examples[i]": what an error names
    image: bytes
    caption: str


def from_base64(examples: list, settings) -> list[RawExample]:
    """JSON examples (schemas.Example: .image base64, .caption) -> raw bytes; the count is checked first."""
    check_count(len(examples), settings)
    return [RawExample(f"examples[{i}]", decode_base64(e.image, f"examples[{i}].image"), e.caption)
            for i, e in enumerate(examples)]


def check_count(n: int, settings) -> None:
    if n > settings.max_examples:
        raise InvalidInput(f"{n} examples; the limit is {settings.max_examples}", "examples")


def check_examples(examples: list[RawExample], settings, other_pixels: int = 0) -> int:
    """Count, captions, and every image header against /retrieve's limits (no pixel decoded). -> pixels to decode.
    `other_pixels`: what the request decodes besides (the images /retrieve ranks), for the shared budget."""
    check_count(len(examples), settings)
    for e in examples:
        caption = e.caption.strip()
        if not caption:
            raise InvalidInput("caption is empty", f"{e.field}.caption")
        if len(caption) > settings.max_text_chars:
            raise InvalidInput(f"caption has {len(caption)} characters; the limit is {settings.max_text_chars}",
                               f"{e.field}.caption")
    images = [(f"{e.field}.image", e.image) for e in examples]
    budget = settings.max_request_pixels - other_pixels
    try:
        return check_pixel_budget(images, settings.max_image_pixels, budget)
    except InvalidInput as err:
        if err.field == "images":  # the request's total: name the examples, which pushed it over
            raise InvalidInput(err.message, "examples") from None
        raise


def examples_sha256(examples: list[RawExample]) -> str:
    """One hash of the examples in order: each image's sha256 and its caption (stripped)."""
    spec = [[hashlib.sha256(e.image).hexdigest(), e.caption.strip()] for e in examples]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def decode_examples(engine: Engine, request: FewShotRequest) -> Examples:
    """Blocking: decode one image at a time into model input (4xx naming a corrupt one), tokenise the captions."""
    pixels = torch.stack([prepare_image(engine, e.image, f"{e.field}.image", request.max_image_pixels)
                          for e in request.examples])
    return Examples(pixels, engine.backbone.tokenize([e.caption.strip() for e in request.examples]).cpu())


@dataclass(frozen=True, eq=False)
class FewShotRequest:
    """A request's examples, checked but not decoded yet (a cache hit never decodes them), and how to refine."""

    examples: tuple[RawExample, ...]
    sha256: str
    config: FewShotConfig
    max_image_pixels: int

    @property
    def count(self) -> int:
        return len(self.examples)

    @property
    def key(self) -> str:
        """What the cache key holds: the examples' identity and the method (its settings are the server's)."""
        return f"{self.sha256}:{self.config.method}"


def fewshot_request(examples: list[RawExample], settings, other_pixels: int = 0) -> FewShotRequest:
    """Check every limit (4xx naming the field) and hash: all before the cache is looked at."""
    check_examples(examples, settings, other_pixels)
    config = FewShotConfig(time_budget_s=settings.fewshot_time_budget_s)
    return FewShotRequest(tuple(examples), examples_sha256(examples), config, settings.max_image_pixels)
