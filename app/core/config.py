"""The service's one settings class. Every value comes from the environment (prefix SGLORA_) or a `.env` file;
nothing else in the service reads the environment.

Invalid values stop start-up with pydantic's message naming the variable (see `app.main.load_settings`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.ml.aggregator import TAU_MIN
from app.ml.strategies import check_strategy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SGLORA_", env_file=".env", extra="ignore", frozen=True)

    # --- model -------------------------------------------------------------------------------------------
    store_path: Path = Field(description="model store directory (python -m offline build --out ...)")
    device: str = Field("auto", description='"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...')
    k: int | None = Field(None, ge=1, description="default number of experts routed to (unset: what the store's "
                          "validation chose for the strategy)")
    tau: float | None = Field(None, ge=TAU_MIN, allow_inf_nan=False, description="default softmax temperature "
                              "(unset: the store's validated one for the strategy)")
    default_strategy: str | None = Field(None, description="unset: the store's default (ranked first by its "
                                         "leave-one-task-out validation; sglora for unvalidated stores)")
    coverage_warning_below: float = Field(
        0.5, ge=-1, le=1, description="max cosine(description, expert) under which a response carries a warning"
    )
    store_watch_s: float = Field(
        0, ge=0, allow_inf_nan=False,
        description="poll the store's version pointer (manifest.json) this often and switch to a new version; 0: off",
    )
    load_in_background: bool = Field(
        False, description="serve /health/live at once and load the model behind it (/health/ready 503 till warm)"
    )

    # --- cache -------------------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="redis://host:port/db; unset => bounded in-process LRU")
    redis_prefix: str = "sglora:"
    redis_socket_timeout_s: float = Field(
        1.0, gt=0, description="a Redis reply later than this is an error (then backoff). It is measured on the "
        "event loop, so it includes the loop's own queue: at 100+ connections that alone reaches a few hundred ms, "
        "and a shorter timeout fails a Redis that answered in time"
    )
    redis_connect_timeout_s: float = Field(
        1.0, gt=0, description="like the socket timeout, timed on the event loop: at 0.25 s a burst of 256 requests "
        "opening the pool's connections at once failed 64 connects to a Redis that was up"
    )
    redis_max_connections: int = Field(
        64, ge=1, description="connections per Redis pool (two pools: cache look-ups and adapter ids); a call "
        "beyond it waits for a free one, up to the socket timeout"
    )
    redis_backoff_s: float = Field(
        2.0, ge=0, description="after a Redis error, skip Redis for this long (requests go on as cache misses)"
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of cached generations and stored adapters")
    generation_lock_ttl_s: float = Field(
        30.0, gt=0, description="expiry of the Redis lock that makes replicas generate a key once: longer than a "
                                "generation; a replica that dies while generating blocks the others at most this long"
    )
    lru_max_entries: int = Field(512, ge=1, description="in-process cache size (entries), when no Redis")

    # --- limits ------------------------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_body_bytes_in_flight: int | None = Field(
        None, ge=1024, description="request body bytes held at once across all requests (declared Content-Length, "
        "or streamed); a body that does not fit gets 503 before it is read. Unset: 2 x max_body_bytes"
    )
    max_images: int = Field(64, ge=1)
    max_texts: int = Field(256, ge=1)
    max_text_chars: int = Field(1000, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_description_chars: int = Field(500, ge=1)
    max_num_samples: int = Field(8, ge=1)
    max_request_pixels: int = Field(
        64 * 1024 * 1024, ge=1, description="decoded-pixel budget of one /retrieve (sum over its images)"
    )
    max_examples: int = Field(16, ge=4, description="image-caption examples one request may refine its adapter "
                              "on (few-shot); their pixels count towards max_request_pixels like /retrieve's")
    fewshot_time_budget_s: float = Field(10.0, gt=0, allow_inf_nan=False,
                                         description="longest few-shot refinement; the best adapter so far is "
                                                     "served when it runs out (the response says it stopped early)")

    # --- load ---------------------------------------------------------------------------------------------
    max_concurrent_work: int = Field(2, ge=1, description="requests doing model work at once (threads)")
    work_threads: int | None = Field(None, ge=1, description="CPU threads (torch intra-op) each of those uses; "
                                     "unset: the process's cores divided by max_concurrent_work, at least 1")
    max_queued_work: int = Field(256, ge=0, description="requests that may wait for a slot; beyond: 503")
    queue_wait_s: float = Field(5.0, ge=0, description="longest wait for a slot; a request whose expected wait "
                                "(measured service time x its place in the queue) is longer gets a 503 at once")
    request_deadline_s: float = Field(30.0, gt=0, description="a request still running after this gets a 503")
    decode_workers: int = Field(2, ge=1, description="images decoded at once, across all requests")
    malloc_arenas: int = Field(2, ge=0, description="glibc malloc arenas (0: glibc's default of 8 per core)")
    batch_window_ms: float = Field(
        0.0, ge=0, description="micro-batching: encodings arriving within this window share one forward (0: off)"
    )
    batch_max_items: int = Field(256, ge=1, description="samples in one micro-batched forward")
    batch_max_queue: int = Field(2048, ge=1, description="samples waiting for a micro-batch; beyond: 503")

    public_url: str | None = Field(
        None, description="base URL clients reach the service at (download_url); unset => relative URLs"
    )

    # --- operations -------------------------------------------------------------------------------------
    log_level: str = Field("INFO", pattern="^(?i)(debug|info|warning|error)$")
    log_json: bool = Field(True, description="one JSON object per log line (false: plain text for a terminal)")
    shutdown_delay_s: float = Field(
        5.0, ge=0, description="after SIGTERM, keep serving this long with readiness 503 (python -m app)"
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="then wait this long for in-flight requests")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must complete a request's headers within this (else 408, closed)"
    )

    # --- playground --------------------------------------------------------------------------------------
    playground: bool = Field(True, description="serve the playground page (static files) at /playground/")

    # --- access ------------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="when set, every non-health route needs header X-API-Key")
    admin_key: SecretStr | None = Field(
        None, description="enables POST /admin/reload (header X-Admin-Key); unset: admin routes answer 403"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description='JSON list or comma-separated: ["https://a.example"] or https://a,https://b'
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return value

    @field_validator("default_strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        return None if value is None else check_strategy(value)

    @field_validator("store_path")
    @classmethod
    def _store_exists(cls, value: Path) -> Path:
        if not (value / "manifest.json").is_file():
            raise ValueError(f"no model store at {value} (manifest.json missing); build one with "
                             f"`python -m offline build --tiny --out {value}`")
        return value

    @property
    def body_budget_bytes(self) -> int:
        return self.max_body_bytes_in_flight or 2 * self.max_body_bytes

    @model_validator(mode="after")
    def _one_body_fits_the_budget(self) -> Settings:
        if self.body_budget_bytes < self.max_body_bytes:
            raise ValueError(f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) is below max_body_bytes "
                             f"({self.max_body_bytes}): a body the limit allows could never be admitted")
        return self

    @model_validator(mode="after")
    def _api_key_not_blank(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError("api_key is set but blank; unset SGLORA_API_KEY to disable authentication")
        if self.admin_key is not None and not self.admin_key.get_secret_value().strip():
            raise ValueError("admin_key is set but blank; unset SGLORA_ADMIN_KEY to switch admin routes off")
        return self
