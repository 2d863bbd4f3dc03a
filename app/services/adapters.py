"""Adapters through the cache: generate (single-flight, cached by parameters), store and fetch by id."""

from __future__ import annotations

import logging
import re
import time

from starlette.concurrency import run_in_threadpool

from app.core.errors import InvalidInput, NotFound
from app.core.metrics import Metrics
from app.services.cache import ADAPTER, Cache, cache_key
from app.services.engine import Engine
from app.services.generator import (
    AdapterFile,
    GenerationParams,
    InvalidAdapter,
    adapter_id_of,
    generate_files,
    parse_adapter,
)

logger = logging.getLogger(__name__)
_ADAPTER_ID = re.compile(r"[0-9a-f]{64}")


class AdapterService:
    def __init__(self, engine: Engine, cache: Cache, metrics: Metrics):
        self.engine, self.cache, self.metrics = engine, cache, metrics

    def _parse(self, data: bytes, current_store: bool) -> AdapterFile:
        engine = self.engine
        return parse_adapter(data, engine.layout, engine.backbone.weights_id,
                             engine.version if current_store else None)

    async def generate(self, params: GenerationParams) -> tuple[AdapterFile, str]:
        """(sample 0's file, "hit" | "miss"). Every sample is also stored by id for /adapters/{id}."""
        key = cache_key(params.description, params.strategy, params.k, params.tau, params.seed, params.num_samples,
                        self.engine.version)

        async def produce() -> bytes:
            t0 = time.perf_counter()
            files = await run_in_threadpool(generate_files, self.engine, params)
            self.metrics.generation_seconds.labels(params.strategy).observe(time.perf_counter() - t0)
            self.metrics.generations.labels(params.strategy).inc()
            for f in files[1:]:
                await self.cache.set(ADAPTER, f.adapter_id, f.data)
            return files[0].data

        async def valid(data: bytes) -> bool:
            try:
                primary = self._parse(data, current_store=True)
            except InvalidAdapter as e:
                logger.warning("cached adapter rejected: %s", e)
                return False
            # A multi-sample entry is only complete while every sample can still be downloaded.
            for sample_id in primary.adapter_ids[1:]:
                if await self.cache.get(ADAPTER, sample_id) is None:
                    return False
            return True

        data, status = await self.cache.get_or_create(key, produce, valid)
        primary = self._parse(data, current_store=True)
        await self.cache.set(ADAPTER, primary.adapter_id, data)  # (re)store by id, refreshing its TTL
        return primary, status

    async def fetch_bytes(self, adapter_id: str) -> bytes:
        if not _ADAPTER_ID.fullmatch(adapter_id):
            raise NotFound(f"unknown adapter_id {adapter_id!r}: ids are 64 lowercase hex digits", "adapter_id")
        data = await self.cache.get(ADAPTER, adapter_id)
        if data is None or adapter_id_of(data) != adapter_id:  # absent, expired, evicted, or damaged in storage
            raise NotFound(f"unknown or expired adapter_id {adapter_id}; generate it again with /generate-lora",
                           "adapter_id")
        return data

    async def fetch(self, adapter_id: str) -> AdapterFile:
        """A stored adapter, checked against the served model (it may come from an older store version)."""
        data = await self.fetch_bytes(adapter_id)
        try:
            return self._parse(data, current_store=False)
        except InvalidAdapter as e:
            raise InvalidInput(f"adapter {adapter_id} cannot be applied to the served model: {e}", "adapter_id") from e
