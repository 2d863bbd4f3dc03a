"""Request and response models. Limits that depend on settings or on the loaded library (description length,
item counts, k <= library size) are checked in the services and reported in the same error format."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from app.ml.aggregator import TAU_MIN
from app.ml.strategies import STRATEGIES, check_strategy

# The largest integer every JSON reader keeps exact (JavaScript, float64 parsers): a seed past it would be
# rounded by some clients, and the schema bound itself cannot be checked exactly beyond it.
SEED_MAX = 2**53 - 1


def _encodable(value: str) -> str:
    """A lone surrogate (JSON "\\ud800") makes a Python str that no UTF-8 consumer (tokenizer, safetensors
    metadata, Redis) can take, and a NUL is no text at all (C strings end there, Redis keys and logs mangle it):
    refuse both here, naming the field, instead of failing (or silently truncating) deep inside."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode (unpaired surrogate at character {e.start})") from None
    if "\x00" in value:
        raise ValueError(f"text contains a NUL character (at character {value.index(chr(0))})")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text is empty")
    return value


# What the document says of a text field (the validators above, as far as a JSON-schema pattern can say it).
NO_NUL_NOT_BLANK = "^[^\\u0000]*\\S[^\\u0000]*$"
Text = Annotated[str, AfterValidator(_encodable)]
Caption = Annotated[Text, AfterValidator(_not_blank), WithJsonSchema({"type": "string", "pattern": NO_NUL_NOT_BLANK})]
# Validated by `check_strategy` (its message lists the choices); the schema shows them as an enum.
StrategyName = Annotated[str, WithJsonSchema({"type": "string", "enum": sorted(STRATEGIES)})]


class GenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: StrategyName | None = Field(None, description="generation strategy (default: the server's, "
                                                            "GET /experts → default_strategy)",
                                          examples=["sglora"])
    k: int | None = Field(None, ge=1, description="experts routed to (default: the server's K)")
    tau: float | None = Field(None, ge=TAU_MIN, allow_inf_nan=False,
                              description="softmax temperature (default: server's)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="CVAE sampling seed: same seed, same adapter")
    gate: bool = Field(True, strict=True,
                       description="when the store's confidence gate predicts no expert helps this task, serve "
                                   "zero-shot (B = 0) and say why; false: the strategy's adapter anyway")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        return None if value is None else check_strategy(value)

    @field_validator("k", "tau", "seed", "num_samples", "top_k", mode="before", check_fields=False)
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        # pydantic's lax mode reads JSON true/false as 1/0 (k, tau, seed, num_samples, top_k); none of these
        # takes a boolean, so one is always a client's mistake (`gate` is the one boolean option).
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        return value


class Example(BaseModel):
    """One image-caption pair of the task, for few-shot refinement."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., min_length=1, description="base64 JPEG/PNG/WebP (a data: URL prefix is accepted)")
    caption: Text = Field(..., min_length=1, description="the caption that goes with the image (not blank)")


EXAMPLES_DESCRIPTION = ("image-caption pairs of the task (at most the server's max_examples, 16 by default): the "
                        "description's adapter is refined on them (merge weights over its routed experts, fitted on "
                        "half, checked on the other half; 4 or more are needed to change anything). Omit for the "
                        "description-only adapter")


class GenerateRequest(GenerationOptions):
    description: Text = Field(..., description="one line describing the task", examples=["a photo of a red circle"])
    num_samples: int = Field(1, ge=1, description="adapters to sample (sglora); each gets its own adapter_id")
    examples: list[Example] | None = Field(None, description=EXAMPLES_DESCRIPTION)


REFINEMENT_DESCRIPTION = ("what the examples did (null without examples): method, examples, steps, seconds, "
                          "loss_before/loss_after (contrastive loss on all the examples), check_loss_before/"
                          "check_loss_after (on the held-out half), stopped_early and stop_reason, weights (over "
                          "the description-only adapter, then candidate_ids)")


class Coverage(BaseModel):
    max_similarity: float | None = Field(description="coverage: the best cosine between the description and any "
                                                     "library expert's (the number the gate checks), whatever "
                                                     "the strategy routed to")
    threshold: float
    warning: str | None = None


class GenerateResponse(BaseModel):
    adapter_id: str
    adapter_ids: list[str] = Field(description="every sample's id; adapter_ids[0] == adapter_id")
    downloadable: bool = Field(description="true: every id can be fetched from /adapters/{id} (until its TTL); "
                                           "false: the cache could not store them, use this response's file")
    download_url: str | None = Field(description="where to fetch adapter_id again; null when not downloadable")
    downloads: dict[str, str] = Field(default_factory=dict, description="download URL per format: safetensors, "
                                      "peft, open_clip-merged (empty when not downloadable)")
    cache: Literal["hit", "miss"]
    strategy: str = Field(description="the strategy requested (or the server's default)")
    served: str = Field(description="whose adapter this is: `strategy`, or zero_shot when the gate fell back")
    trace: dict | None = Field(description="the routed experts, one entry per expert in each list (expert_ids, "
                                           "descriptions, similarities, predicted_gains, weights, reasons: why "
                                           "each was chosen), and how they were chosen (routed_by, routing); "
                                           "null for zero_shot and when gated (no expert was applied)")
    coverage: Coverage
    gated: str | None = Field(None, description="why the confidence gate served zero-shot (B = 0) instead of "
                                                "the strategy's adapter; null when it did not")
    refinement: dict | None = Field(None, description=REFINEMENT_DESCRIPTION)
    metadata: dict[str, str]


class RetrieveOptions(GenerationOptions):
    """Everything of a /retrieve request except the images (base64 in JSON, files in multipart)."""

    texts: list[Caption] = Field(..., min_length=1, description="candidate captions (not blank)")
    description: Text | None = Field(None, description="generate an adapter for this task (through the cache)")
    adapter_id: Text | None = Field(None, description="use a previously generated adapter")
    top_k: int | None = Field(None, ge=1, description="ranked items returned per query (default: all)")


class RetrieveJSON(RetrieveOptions):
    images: list[str] = Field(..., min_length=1, description="base64 JPEG/PNG/WebP (a data: URL prefix is accepted)")
    examples: list[Example] | None = Field(None, description=EXAMPLES_DESCRIPTION + " (with description only)")


class Ranked(BaseModel):
    index: int
    score: float


class ImageRanking(BaseModel):
    index: int
    texts: list[Ranked]


class TextRanking(BaseModel):
    index: int
    images: list[Ranked]


class AdapterUsed(BaseModel):
    source: Literal["zero_shot", "description", "adapter_id"]
    adapter_id: str | None = None
    downloadable: bool | None = Field(None, description="whether adapter_id can be fetched from /adapters/{id}")
    cache: Literal["hit", "miss"] | None = None
    strategy: str | None = None
    max_similarity: float | None = Field(None, description="coverage of the description: best cosine to any "
                                                           "library expert")
    gated: str | None = Field(None, description="why the confidence gate fell back to zero-shot (null: it did not)")
    refinement: dict | None = Field(None, description=REFINEMENT_DESCRIPTION)


class RetrieveResponse(BaseModel):
    store_version: str = Field(description="the store version this answer was made with")
    adapter: AdapterUsed
    images: list[ImageRanking] = Field(description="per image: texts ranked by cosine, best first")
    texts: list[TextRanking] = Field(description="per text: images ranked by cosine, best first")


class Expert(BaseModel):
    id: str
    description: str
    provenance: dict
    similarity: float | None = Field(None, description="with ?q=: cosine between q and this expert's description")


class ExpertsResponse(BaseModel):
    store_version: str
    count: int = Field(description="experts in the library (all pages)")
    offset: int = 0
    limit: int | None = None
    q: str | None = Field(None, description="the search text, when searching: experts are then nearest first")
    index: dict | None = Field(None, description="the routing index: factory, search breadth, recall@4 vs exact")
    experts: list[Expert]
    # How the store's CVAE was trained (manifest cvae.info), null without one. best_step 0 means early stopping
    # kept the untrained residual decoder: sglora then returns its prior's µ*, whatever the seed.
    cvae: dict | None = None
    default_strategy: str | None = Field(None, description="the strategy a request without one gets "
                                                           "(SGLORA_DEFAULT_STRATEGY, else the store's validated one)")
    # What the store's leave-one-task-out validation chose (default strategy, K/τ per strategy, gate, router) and
    # the figures behind it; null for a store built before validation.
    routing: dict | None = None


class ReloadResponse(BaseModel):
    changed: bool = Field(description="false when the store's pointer already named the served version")
    version: str = Field(description="the version served from now on")
    previous_version: str
    experts: int | None = None
    seconds: float | None = Field(None, description="load + check + warm-up time of the new version")


class Health(BaseModel):
    status: str
    store_version: str | None = None
    cache_backend: str | None = None
    cache_degraded: bool | None = None
    detail: str | None = None
