"""The adapter cache: an accelerator, never a dependency (DESIGN decision 8).

Two namespaces in one backend, both with a TTL:
  gen:<key>        key = sha256 of (normalised description, strategy, k, tau, seed, num_samples, store
                   version, cache format) -> the adapter file of sample 0 (safetensors bytes)
  adapter:<id>     adapter id (sha256 of the file) -> the file, for GET /adapters/{id} and /retrieve

Backends: Redis when a URL is configured (short socket timeouts, no retries), else a bounded in-process LRU.
Any backend error is counted, logged, and turned into a miss (reads) or a no-op (writes); after an error the
backend is skipped for `backoff_s` so a hanging Redis costs one timeout, not one per request. A value that fails
validation (corrupt, or made for another layout/store) is a miss and is overwritten. Concurrent misses of one
key generate once: the first request does the work, the others await its result (single-flight, per process).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.core.metrics import Metrics

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the value format changes: old entries then simply stop matching
GEN, ADAPTER = "gen", "adapter"


def normalise_description(text: str) -> str:
    """The cache's view of a description: case and whitespace do not make a different task."""
    return " ".join(text.split()).lower()


def cache_key(description: str, strategy: str, k: int, tau: float, seed: int, num_samples: int,
              store_version: str) -> str:
    """Every input that changes the output, and the store (library + CVAE) version."""
    spec = {"format": CACHE_FORMAT, "description": normalise_description(description), "strategy": strategy,
            "k": int(k), "tau": repr(float(tau)), "seed": int(seed), "num_samples": int(num_samples),
            "store_version": store_version}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class LRUBackend:
    name = "lru"

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._items[key] = (time.monotonic() + ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, prefix: str, socket_timeout_s: float, connect_timeout_s: float):
        self.prefix = prefix
        # No retries: a failed call is a miss at once; the caller's backoff handles an outage.
        self.client = aioredis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                              socket_connect_timeout=connect_timeout_s,
                                              retry=Retry(NoBackoff(), 0), retry_on_timeout=False)

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(self.prefix + key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.client.set(self.prefix + key, value, ex=ttl_s)

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class Cache:
    def __init__(self, backend, metrics: Metrics, ttl_s: int, backoff_s: float = 2.0):
        self.backend, self.metrics, self.ttl_s, self.backoff_s = backend, metrics, ttl_s, backoff_s
        self._down_until = 0.0
        self._inflight: dict[str, asyncio.Future] = {}

    @property
    def degraded(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, op: str, error: Exception) -> None:
        self.metrics.cache_errors.labels(self.backend.name, op).inc()
        self._down_until = time.monotonic() + self.backoff_s
        logger.warning("cache %s %s failed (%s: %s); serving without cache for %.1fs", self.backend.name, op,
                       type(error).__name__, error, self.backoff_s)

    async def get(self, namespace: str, key: str) -> bytes | None:
        if self.degraded:
            self.metrics.cache_bypassed.inc()
            return None
        try:
            return await self.backend.get(f"{namespace}:{key}")
        except Exception as e:  # redis ConnectionError/TimeoutError/ResponseError...: all mean "no value"
            self._failed("get", e)
            return None

    async def set(self, namespace: str, key: str, value: bytes) -> None:
        if self.degraded:
            self.metrics.cache_bypassed.inc()
            return
        try:
            await self.backend.set(f"{namespace}:{key}", value, self.ttl_s)
        except Exception as e:
            self._failed("set", e)

    async def get_or_create(self, key: str, produce: Callable[[], Awaitable[bytes]],
                            valid: Callable[[bytes], Awaitable[bool]]) -> tuple[bytes, str]:
        """(value, "hit" | "miss"): the cached value if it passes `valid`, else `produce()`'s (then stored).

        Concurrent calls for one key while the first is producing wait for its result and report "hit"
        (they generated nothing); `sglora_cache_coalesced_total` counts them.
        """
        pending = self._inflight.get(key)
        if pending is not None:
            self.metrics.cache_coalesced.inc()
            value, _ = await asyncio.shield(pending)
            return value, "hit"
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await self.get(GEN, key)
            if value is not None and not await valid(value):
                self.metrics.cache_corrupt.inc()
                logger.warning("cache entry %s… failed validation; regenerating", key[:12])
                value = None
            if value is not None:
                self.metrics.cache_hits.labels(self.backend.name).inc()
                status = "hit"
            else:
                self.metrics.cache_misses.labels(self.backend.name).inc()
                value, status = await produce(), "miss"
                await self.set(GEN, key, value)
            future.set_result((value, status))
            return value, status
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(e)
                future.exception()  # mark retrieved: followers (if any) re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)

    async def ping(self) -> bool:
        try:
            return await self.backend.ping()
        except Exception:
            return False

    async def close(self) -> None:
        try:
            await self.backend.close()
        except Exception as e:  # closing a client whose server went away must not fail shutdown
            logger.warning("closing cache backend: %s", e)


def make_cache(settings, metrics: Metrics) -> Cache:
    if settings.redis_url:
        backend = RedisBackend(settings.redis_url, settings.redis_prefix, settings.redis_socket_timeout_s,
                               settings.redis_connect_timeout_s)
    else:
        backend = LRUBackend(settings.lru_max_entries)
    return Cache(backend, metrics, settings.cache_ttl_s, settings.redis_backoff_s)
