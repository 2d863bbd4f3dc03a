"""Request and response models. Limits that depend on settings or on the loaded library (description length,
item counts, k <= library size) are checked in the services and reported in the same error format."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.ml.strategies import STRATEGIES

SEED_MAX = 2**63 - 1


def _check_strategy(value: str) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"unknown strategy {value!r}; choose one of {sorted(STRATEGIES)}")
    return value


class GenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: str | None = Field(None, description=f"one of {sorted(STRATEGIES)} (default: the server's, sglora)",
                                 examples=["sglora"])
    k: int | None = Field(None, ge=1, description="experts routed to (default: the server's K)")
    tau: float | None = Field(None, gt=0, allow_inf_nan=False, description="softmax temperature (default: server's)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="CVAE sampling seed: same seed, same adapter")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        return None if value is None else _check_strategy(value)


class GenerateRequest(GenerationOptions):
    description: str = Field(..., description="one line describing the task", examples=["a photo of a red circle"])
    num_samples: int = Field(1, ge=1, description="adapters to sample (sglora); each gets its own adapter_id")


class Coverage(BaseModel):
    max_similarity: float | None = Field(description="best cosine between the description and an expert's")
    threshold: float
    warning: str | None = None


class GenerateResponse(BaseModel):
    adapter_id: str
    adapter_ids: list[str] = Field(description="every sample's id; adapter_ids[0] == adapter_id")
    download_url: str
    downloads: dict[str, str] = Field(default_factory=dict,
                                      description="download URL per format: safetensors, peft, open_clip-merged")
    cache: Literal["hit", "miss"]
    strategy: str
    trace: dict | None = Field(description="expert_ids, descriptions, similarities, weights, max_similarity")
    coverage: Coverage
    metadata: dict[str, str]


class RetrieveOptions(GenerationOptions):
    """Everything of a /retrieve request except the images (base64 in JSON, files in multipart)."""

    texts: list[str] = Field(..., description="candidate captions")
    description: str | None = Field(None, description="generate an adapter for this task (through the cache)")
    adapter_id: str | None = Field(None, description="use a previously generated adapter")
    top_k: int | None = Field(None, ge=1, description="ranked items returned per query (default: all)")


class RetrieveJSON(RetrieveOptions):
    images: list[str] = Field(..., description="base64 JPEG/PNG/WebP (a data: URL prefix is accepted)")


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
    cache: Literal["hit", "miss"] | None = None
    strategy: str | None = None
    max_similarity: float | None = None


class RetrieveResponse(BaseModel):
    adapter: AdapterUsed
    images: list[ImageRanking] = Field(description="per image: texts ranked by cosine, best first")
    texts: list[TextRanking] = Field(description="per text: images ranked by cosine, best first")


class Expert(BaseModel):
    id: str
    description: str
    provenance: dict


class ExpertsResponse(BaseModel):
    store_version: str
    count: int
    experts: list[Expert]
    # How the store's CVAE was trained (manifest cvae.info), null without one. best_step 0 means early stopping
    # kept the untrained residual decoder: sglora then returns the top-K weighted merge µ*, whatever the seed.
    cvae: dict | None = None


class Health(BaseModel):
    status: str
    store_version: str | None = None
    cache_backend: str | None = None
    cache_degraded: bool | None = None
    detail: str | None = None
