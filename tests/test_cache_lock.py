"""Single-flight across replicas: Cache instances sharing one real Redis (each one a replica's cache) generate a key
once; a lock left by a dead replica expires; with Redis down each process still generates once (local
single-flight). Keys live under a unique prefix and are removed afterwards."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from app.core.metrics import Metrics
from app.services.cache import Cache, RedisBackend

from .test_service_support import CLOSED_PORT_URL, REDIS_URL, drop_prefix, redis_client

LOCK_TTL_S = 1.0


@pytest.fixture
def prefix():
    redis_client()
    name = f"sglora-test-lock:{uuid.uuid4().hex[:12]}:"
    yield name
    drop_prefix(name)


def replica_cache(prefix: str, url: str = REDIS_URL) -> Cache:
    backend = RedisBackend(url, prefix, socket_timeout_s=0.25, connect_timeout_s=0.25)
    return Cache(backend, Metrics(), ttl_s=60, backoff_s=2.0, lock_ttl_s=LOCK_TTL_S)


def slow_producer(calls: list, value: bytes, delay_s: float = 0.3):
    async def produce() -> tuple[bytes, bytes]:  # (bytes to cache, the item handed back)
        calls.append(time.monotonic())
        await asyncio.sleep(delay_s)  # long enough that every other request arrives while this one generates
        return value, value

    return produce


async def load(value: bytes) -> bytes:  # every stored value is usable here
    return value


def cache_lock_waits(metrics: Metrics) -> float:
    return sum(s.value for f in metrics.cache_lock_waits.collect() for s in f.samples if s.name.endswith("_total"))


async def _close(*caches: Cache) -> None:
    for cache in caches:
        await cache.close()


def test_concurrent_misses_on_two_replicas_produce_once(prefix):
    async def scenario():
        a, b = replica_cache(prefix), replica_cache(prefix)
        calls: list = []
        produce = slow_producer(calls, b"adapter")
        try:
            results = await asyncio.gather(*(cache.get_or_create("k", produce, load) for cache in (a, b, a, b)))
        finally:
            await _close(a, b)
        return calls, results, a.metrics, b.metrics

    calls, results, ma, mb = asyncio.run(scenario())
    assert len(calls) == 1, f"{len(calls)} generations for one key on two replicas"
    assert [item for item, _ in results] == [b"adapter"] * 4
    assert [status for _, status in results].count("miss") == 1
    # The other replica's leader waited on the lock; each replica's second request on its own leader.
    assert cache_lock_waits(ma) + cache_lock_waits(mb) == 1


def test_a_lock_left_by_a_dead_replica_expires(prefix):
    client = redis.Redis.from_url(REDIS_URL)
    # A replica that took the lock and died: nobody will release it, and nothing gets cached.
    client.set(f"{prefix}lock:gen:k", b"dead-replica-token", px=int(LOCK_TTL_S * 1000))

    async def scenario():
        cache = replica_cache(prefix)
        calls: list = []
        t0 = time.monotonic()
        try:
            item, status = await cache.get_or_create("k", slow_producer(calls, b"v", 0.0), load)
        finally:
            await cache.close()
        return item, status, calls, time.monotonic() - t0, cache.metrics

    item, status, calls, elapsed, metrics = asyncio.run(scenario())
    assert (item, status, len(calls)) == (b"v", "miss", 1)
    assert elapsed >= LOCK_TTL_S * 0.5, "it generated without waiting for the lock"
    assert elapsed < LOCK_TTL_S * 1.1 + 0.5 + 3, "it waited far past the lock's expiry"
    assert cache_lock_waits(metrics) == 1
    assert client.get(f"{prefix}lock:gen:k") is None, "the lock is released after generating"


def test_a_failed_generation_releases_the_lock_for_the_other_replica(prefix):
    async def scenario():
        a, b = replica_cache(prefix), replica_cache(prefix)
        calls: list = []

        async def failing() -> tuple[bytes, bytes]:
            calls.append("a")
            await asyncio.sleep(0.2)
            raise RuntimeError("generation failed")

        async def b_later():
            await asyncio.sleep(0.05)  # b arrives while a holds the lock
            return await b.get_or_create("k", slow_producer(calls, b"from-b", 0.0), load)

        try:
            outcome = await asyncio.gather(a.get_or_create("k", failing, load), b_later(), return_exceptions=True)
        finally:
            await _close(a, b)
        return outcome, calls

    (a_result, b_result), calls = asyncio.run(scenario())
    assert isinstance(a_result, RuntimeError)
    assert b_result == (b"from-b", "miss") and calls[0] == "a" and len(calls) == 2


def test_with_redis_down_each_process_still_generates_once(prefix):
    async def scenario():
        cache = replica_cache(prefix, CLOSED_PORT_URL)
        calls: list = []
        try:
            results = await asyncio.gather(*(cache.get_or_create("k", slow_producer(calls, b"v"), load)
                                             for _ in range(4)))
        finally:
            await cache.close()
        return calls, results, cache.metrics

    calls, results, metrics = asyncio.run(scenario())
    assert len(calls) == 1, "local single-flight holds without Redis"
    assert [r for r, _ in results] == [b"v"] * 4
    assert sum(s.value for f in metrics.cache_errors.collect() for s in f.samples if s.name.endswith("_total")) >= 1
