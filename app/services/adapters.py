"""Adapters through the cache: generate (single-flight, cached by parameters), store and fetch by id.

An id in a 200 is a promise: every id a generation hands out is written with `Cache.store_durably` (retried,
even while the cache backs off), and `Generated.stored` says whether that landed, so a response can tell the
client plainly that an id is not downloadable instead of a silent 404 later.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.core.errors import InvalidInput, NotFound
from app.core.logging import bind
from app.core.metrics import Metrics
from app.ml.store import Store
from app.services.admission import Admission, Slot
from app.services.batching import MicroBatcher
from app.services.cache import ADAPTER, Cache, cache_key
from app.services.engine import Engine
from app.services.export import Export, export_adapter
from app.services.fewshot import decode_examples
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


@dataclass(frozen=True)
class Generated:
    adapter: AdapterFile  # sample 0 (its metadata lists the other samples' ids)
    cache: str  # "hit" | "miss"
    stored: bool  # every id in adapter.adapter_ids can be downloaded from /adapters/{id}


@dataclass(frozen=True)
class _Entry:
    """What single-flight shares between the requests of one key: the parsed file, and whether the other
    samples' ids are stored (known to the producer, checked on a hit)."""

    adapter: AdapterFile
    samples_stored: bool


class AdapterService:
    def __init__(self, engine: Engine, cache: Cache, metrics: Metrics, admission: Admission,
                 batcher: MicroBatcher | None = None):
        self.engine, self.cache, self.metrics, self.admission = engine, cache, metrics, admission
        self.batcher = batcher

    def _parse(self, data: bytes, store_version: str | None) -> AdapterFile:
        engine = self.engine
        return parse_adapter(data, engine.layout, engine.backbone.weights_id, store_version)

    async def _generate_files(self, params: GenerationParams, slot: Slot | None,
                              disconnected: Callable[[], Awaitable[bool]] | None, store: Store) -> list[AdapterFile]:
        """The model work of a miss, in the caller's admission slot or (a cache hit needs none) one of its own."""
        query = None
        if self.batcher is not None and slot is None:
            # The routing embedding joins the next text micro-batch, which takes a slot of its own: never while
            # holding the caller's slot (with every slot held that way, the batch could never run).
            query = (await self.batcher.encode("text", [params.description], None))[0].cpu().numpy()
        if slot is None:
            async with self.admission.slot(disconnected) as own:
                return await self._generate_steps(params, own, store, query)
        return await self._generate_steps(params, slot, store, query)

    async def _generate_steps(self, params: GenerationParams, slot: Slot, store: Store, query) -> list[AdapterFile]:
        """The few-shot examples' decoding (a miss only), the routing embedding (unless batched), then the
        generation: separate steps, so that a client gone during one is noticed before the next starts (every
        Slot.run is a safe point)."""
        examples = None
        if params.fewshot is not None:  # decoded on a miss only, one image at a time in the decode pool
            examples = await slot.run(decode_examples, self.engine, params.fewshot, decode=True)
        if query is None:
            query = await slot.run(self.engine.describe, params.description)
        return await slot.run(generate_files, self.engine, params, query, store, examples)

    async def generate(self, params: GenerationParams, slot: Slot | None = None,
                       disconnected: Callable[[], Awaitable[bool]] | None = None) -> Generated:
        """Sample 0's file, whether it came from the cache, and whether every sample's id is stored.

        `slot`: the caller's admission slot, when it holds one (else a miss takes its own, dropping the work when
        `disconnected()` says the client has gone by then).

        The store version is read once: a live switch while this request runs does not change what it answers
        with (its cache key, its generation and the version in its metadata all name the same one)."""
        store = self.engine.store
        key = cache_key(params.description, params.strategy, params.k, params.tau, params.seed, params.num_samples,
                        store.version, params.gate, params.examples_key)

        async def produce() -> tuple[bytes, _Entry]:
            t0 = time.perf_counter()
            files = await self._generate_files(params, slot, disconnected, store)
            self.metrics.generation_seconds.labels(params.strategy).observe(time.perf_counter() - t0)
            self.metrics.generations.labels(params.strategy).inc()
            stored = await self.cache.store_durably(ADAPTER, {f.adapter_id: f.data for f in files[1:]})
            return files[0].data, _Entry(files[0], stored)

        async def load(data: bytes) -> _Entry | None:
            try:
                # Off the loop: loading the tensors and checking them is CPU work on every cache hit.
                primary = await asyncio.to_thread(self._parse, data, store.version)
            except InvalidAdapter as e:
                logger.warning("cached adapter rejected: %s", e)
                return None
            # A multi-sample entry is only complete while every sample can still be downloaded.
            others = primary.adapter_ids[1:]
            if others and not await self.cache.exists_durably(ADAPTER, others):
                return None
            return _Entry(primary, True)

        # A miss that admission would refuse now is refused before the cache's lock round trips: under overload,
        # clients that ignore Retry-After send refusals by the hundred, and each must cost far less than a generation.
        entry, status = await self.cache.get_or_create(key, produce, load,
                                                       self.admission.check if slot is None else None)
        bind(cache=status, strategy=params.strategy)  # for the request's access line
        primary = entry.adapter
        # (Re)store sample 0 by id, refreshing its TTL; the promise the response makes depends on it. On a hit the id
        # is usually still stored: its TTL is extended and the bytes are sent only if it is gone.
        stored = await self.cache.store_durably(ADAPTER, {primary.adapter_id: primary.data},
                                                keep_existing=status == "hit")
        if not (stored and entry.samples_stored):
            self.metrics.ids_not_stored.inc()
            logger.error("adapter %s could not be stored; the response says it is not downloadable",
                         primary.adapter_id)
        return Generated(primary, status, stored and entry.samples_stored)

    async def export(self, adapter: AdapterFile, fmt: str,
                     disconnected: Callable[[], Awaitable[bool]] | None = None) -> Export:
        """The adapter in `fmt`. The native file is at hand; the other formats are built (PEFT folder, or the
        base weights with the adapter merged: model-sized) in an admission slot, like any other model work."""
        if fmt == "safetensors":
            return export_adapter(self.engine, adapter, fmt)
        async with self.admission.slot(disconnected) as slot:
            return await slot.run(export_adapter, self.engine, adapter, fmt)

    async def fetch_bytes(self, adapter_id: str) -> bytes:
        if not _ADAPTER_ID.fullmatch(adapter_id):
            # Not echoed: it can be of any length and any content.
            raise NotFound("unknown adapter_id: ids are 64 lowercase hex digits", "adapter_id")
        data = await self.cache.get_durably(ADAPTER, adapter_id)
        # Hashing a file is CPU work that scales with its size: off the event loop.
        if data is None or await asyncio.to_thread(adapter_id_of, data) != adapter_id:  # absent, expired, damaged
            raise NotFound(f"unknown or expired adapter_id {adapter_id}; generate it again with /generate-lora",
                           "adapter_id")
        return data

    async def fetch(self, adapter_id: str) -> AdapterFile:
        """A stored adapter, checked against the served model (it may come from an older store version)."""
        data = await self.fetch_bytes(adapter_id)
        try:
            return await asyncio.to_thread(self._parse, data, None)
        except InvalidAdapter as e:
            raise InvalidInput(f"adapter {adapter_id} cannot be applied to the served model: {e}", "adapter_id") from e
