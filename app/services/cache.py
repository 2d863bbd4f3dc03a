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

Adapter ids are different: a 200 that hands out an id promises that /adapters/{id} serves it. `store_durably`
therefore ignores the backoff and retries on a fresh connection (a restarted Redis leaves dead sockets in the
pool), and reports whether the write landed, so the response can say plainly when an id is not downloadable.

Across processes (replicas sharing one Redis) the process's leader also takes the key's lock in Redis
(`lock:gen:<key>`, redis-py's Lock: SET NX with an expiry, token-checked release) while it generates; a replica that
finds the lock taken waits for it, then reads the cache again: the holder stored the value before releasing. The
expiry bounds how long a replica that died mid-generation blocks the others. When Redis is down the lock is skipped
and each process falls back to its own single-flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import LockNotOwnedError

from app.core.errors import CacheUnavailable
from app.core.metrics import Metrics

logger = logging.getLogger(__name__)

# Bump when the value format changes: old entries then simply stop matching. 2: files record coverage and reasons.
CACHE_FORMAT = 2
GEN, ADAPTER = "gen", "adapter"
DURABLE_RETRIES = 2  # extra attempts for an id write, each on a fresh connection
T = TypeVar("T")


def normalise_description(text: str) -> str:
    """The cache's view of a description: case and whitespace do not make a different task."""
    return " ".join(text.split()).lower()


def cache_key(description: str, strategy: str, k: int, tau: float, seed: int, num_samples: int,
              store_version: str, gate: bool = True, examples: str | None = None) -> str:
    """Every input that changes the output, and the store (library + CVAE) version. `examples`: the few-shot
    examples' identity (their sha256 and the refinement method, app/services/fewshot.py), None without any."""
    spec = {"format": CACHE_FORMAT, "description": normalise_description(description), "strategy": strategy,
            "k": int(k), "tau": repr(float(tau)), "seed": int(seed), "num_samples": int(num_samples),
            "store_version": store_version}
    if not gate:  # keys of gated requests (the default) stay what they were
        spec["gate"] = False
    if examples is not None:  # likewise for requests without examples
        spec["examples"] = examples
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

    async def set_many_durably(self, items: dict[str, bytes], ttl_s: int) -> None:
        for key, value in items.items():
            await self.set(key, value, ttl_s)

    async def keep_many_durably(self, items: dict[str, bytes], ttl_s: int) -> None:
        await self.set_many_durably(items, ttl_s)  # in-process: re-setting a value copies nothing

    async def exists_durably(self, keys: list[str]) -> bool:
        return all(await self.get(key) is not None for key in keys)

    async def get_durably(self, key: str) -> bytes | None:
        return await self.get(key)

    def lock(self, name: str, ttl_s: float):
        return None  # one process: its own single-flight is the whole story

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, prefix: str, socket_timeout_s: float, connect_timeout_s: float,
                 max_connections: int = 64):
        self.prefix = prefix

        def pool(retry: Retry) -> aioredis.Redis:
            # Bounded, and a call waits (up to the socket timeout) for a free connection: redis-py's default pool
            # raises MaxConnectionsError past 100 calls in flight, which at 128+ concurrent cache hits put the cache
            # in backoff and turned hits into generations (measured with bench.load: 200-750 errors per cell).
            return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=socket_timeout_s, socket_timeout=socket_timeout_s,
                socket_connect_timeout=connect_timeout_s, retry=retry))

        # No retries: a failed call is a miss at once; the caller's backoff handles an outage.
        self.client = pool(Retry(NoBackoff(), 0))
        # Id writes get their own pool whose calls retry: redis-py drops the failed connection and dials a
        # new one before each retry, which is what a restarted Redis needs.
        self.durable = pool(Retry(ExponentialBackoff(cap=0.1, base=0.01), DURABLE_RETRIES))

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(self.prefix + key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.client.set(self.prefix + key, value, ex=ttl_s)

    async def set_many_durably(self, items: dict[str, bytes], ttl_s: int) -> None:
        async with self.durable.pipeline(transaction=False) as pipe:  # one round trip for every sample's id
            for key, value in items.items():
                pipe.set(self.prefix + key, value, ex=ttl_s)
            await pipe.execute()

    async def keep_many_durably(self, items: dict[str, bytes], ttl_s: int) -> None:
        """Extend the TTL of the entries still stored and upload only those that are gone (expired or evicted): a
        cache hit costs one EXPIRE per id instead of sending the adapter (ViT-B/16: ~0.4 MB) to Redis again."""
        keys = list(items)
        async with self.durable.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.expire(self.prefix + key, ttl_s)
            present = await pipe.execute()
        gone = {key: items[key] for key, kept in zip(keys, present, strict=True) if not kept}
        if gone:
            await self.set_many_durably(gone, ttl_s)

    async def exists_durably(self, keys: list[str]) -> bool:
        return await self.durable.exists(*(self.prefix + k for k in keys)) == len(keys)

    async def get_durably(self, key: str) -> bytes | None:
        return await self.durable.get(self.prefix + key)

    def lock(self, name: str, ttl_s: float):
        """A lock shared by every process on this Redis and prefix; it expires after ttl_s if never released."""
        return self.client.lock(self.prefix + name, timeout=ttl_s, sleep=0.05)

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
        await self.durable.aclose()


class Cache:
    def __init__(self, backend, metrics: Metrics, ttl_s: int, backoff_s: float = 2.0, lock_ttl_s: float = 30.0):
        self.backend, self.metrics, self.ttl_s, self.backoff_s = backend, metrics, ttl_s, backoff_s
        self.lock_ttl_s = lock_ttl_s
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

    async def store_durably(self, namespace: str, items: dict[str, bytes], keep_existing: bool = False) -> bool:
        """Write entries that a response promises (adapter ids), degraded or not; True once they are stored.
        `keep_existing`: an entry still stored only has its TTL extended (content-addressed ids: same key, same
        bytes), the rest are written."""
        if not items:
            return True
        write = self.backend.keep_many_durably if keep_existing else self.backend.set_many_durably
        try:
            await write({f"{namespace}:{k}": v for k, v in items.items()}, self.ttl_s)
            return True
        except Exception as e:
            self._failed("store", e)
            return False

    async def get_durably(self, namespace: str, key: str) -> bytes | None:
        """A promised entry (an adapter id), asked even while degraded; CacheUnavailable when the backend cannot
        answer, so that a stored id is never reported unknown just because Redis blinked."""
        try:
            return await self.backend.get_durably(f"{namespace}:{key}")
        except Exception as e:
            self._failed("get", e)
            raise CacheUnavailable("the adapter store is unreachable right now; retry shortly") from e

    async def exists_durably(self, namespace: str, keys: list[str]) -> bool:
        """Whether every key is stored, asked even while degraded (False when the backend cannot tell)."""
        try:
            return await self.backend.exists_durably([f"{namespace}:{k}" for k in keys])
        except Exception as e:
            self._failed("exists", e)
            return False

    async def get_or_create(self, key: str, produce: Callable[[], Awaitable[tuple[bytes, T]]],
                            load: Callable[[bytes], Awaitable[T | None]],
                            before_producing: Callable[[], None] | None = None) -> tuple[T, str]:
        """(item, "hit" | "miss"): the cached value loaded by `load` (None: unusable), else `produce()`'s item,
        whose bytes are then cached. Each value is loaded (parsed) once per call, never twice.
        `before_producing()` runs on a miss before anything else is done for it (the shared lock, the second read)
        and may raise to refuse the request there.

        Concurrent calls for one key while the first is producing wait for its item and report "hit"
        (they generated nothing); `sglora_cache_coalesced_total` counts them.
        """
        while (pending := self._inflight.get(key)) is not None:
            self.metrics.cache_coalesced.inc()
            try:
                item, _ = await asyncio.shield(pending)
                return item, "hit"
            except asyncio.CancelledError:
                # The leader's request was cut (deadline, disconnect); unless this request was too, lead instead.
                if not pending.cancelled() or asyncio.current_task().cancelling():
                    raise
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await self.get(GEN, key)
            item = await load(value) if value is not None else None
            if value is not None and item is None:
                self.metrics.cache_corrupt.inc()
                logger.warning("cache entry %s… failed validation; regenerating", key[:12])
            if item is not None:
                self.metrics.cache_hits.labels(self.backend.name).inc()
                status = "hit"
            else:
                if before_producing is not None:
                    before_producing()
                item, status = await self._produce_once_across_replicas(key, produce, load)
            future.set_result((item, status))
            return item, status
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(e)
                future.exception()  # mark retrieved: followers (if any) re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)

    async def _produce_once_across_replicas(self, key: str, produce: Callable[[], Awaitable[tuple[bytes, T]]],
                                            load: Callable[[bytes], Awaitable[T | None]]) -> tuple[T, str]:
        """A miss in this process: produce under the key's shared lock, after reading the cache again. The holder
        stores its value before releasing, so a replica that waited finds it there; so does one that did not wait
        but whose first read came just before the holder's write and whose lock came just after its release."""
        async with self._shared_lock(key) as another_may_have_stored:
            if another_may_have_stored:
                value = await self.get(GEN, key)
                item = await load(value) if value is not None else None
                if item is not None:
                    self.metrics.cache_hits.labels(self.backend.name).inc()
                    return item, "hit"
            self.metrics.cache_misses.labels(self.backend.name).inc()
            value, item = await produce()
            await self.set(GEN, key, value)
            return item, "miss"

    @asynccontextmanager
    async def _shared_lock(self, key: str) -> AsyncIterator[bool]:
        """Hold `lock:gen:<key>` on the backend, if it has one and answers; yields whether another process may have
        stored the key since it was read (a lock was taken or waited for). Never fails a request: a backend error
        or a lock held past its expiry means going on without."""
        lock = None if self.degraded else self.backend.lock(f"lock:{GEN}:{key}", self.lock_ttl_s)
        waited = False
        if lock is not None:
            try:
                if not await lock.acquire(blocking=False):
                    waited = True
                    self.metrics.cache_lock_waits.inc()
                    # Wait a little over one expiry: by then the holder released it, or it died and the lock
                    # expired (redis-py polls every 50 ms and may stop just short of the deadline).
                    wait_s = self.lock_ttl_s * 1.1 + 0.5
                    if not await lock.acquire(blocking=True, blocking_timeout=wait_s):
                        logger.warning("generation lock %s… still taken after %.1fs; generating without it", key[:12],
                                       wait_s)
                        lock = None
            except Exception as e:  # Redis down or slow: this process's own single-flight still holds
                self._failed("lock", e)
                lock = None
        try:
            yield waited or lock is not None
        finally:
            if lock is not None:
                await self._release(lock, key)

    async def _release(self, lock, key: str) -> None:
        try:
            await lock.release()
        except LockNotOwnedError:  # it expired while generating and another replica may hold it now: not ours
            logger.warning("generation lock %s… expired before the generation finished (SGLORA_GENERATION_LOCK_TTL_S"
                           " = %.1fs is shorter than a generation)", key[:12], self.lock_ttl_s)
        except Exception as e:  # it expires by itself
            self._failed("unlock", e)

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
                               settings.redis_connect_timeout_s, settings.redis_max_connections)
    else:
        backend = LRUBackend(settings.lru_max_entries)
    return Cache(backend, metrics, settings.cache_ttl_s, settings.redis_backoff_s, settings.generation_lock_ttl_s)
