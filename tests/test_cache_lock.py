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

# Longer than any scheduling delay of a busy machine: a lock that expired early (or a socket read that timed out)
# would let the other replica generate too. Only the dead-replica test needs a lock that expires, and it forces one.
LOCK_TTL_S = 30.0
DEAD_LOCK_TTL_S = 2.0
SOCKET_TIMEOUT_S = 5.0


@pytest.fixture
def prefix():
    redis_client()
    name = f"sglora-test-lock:{uuid.uuid4().hex[:12]}:"
    yield name
    drop_prefix(name)


def replica_cache(prefix: str, url: str = REDIS_URL, lock_ttl_s: float = LOCK_TTL_S) -> Cache:
    backend = RedisBackend(url, prefix, socket_timeout_s=SOCKET_TIMEOUT_S, connect_timeout_s=SOCKET_TIMEOUT_S)
    return Cache(backend, Metrics(), ttl_s=60, backoff_s=2.0, lock_ttl_s=lock_ttl_s)


def producer(calls: list, value: bytes, hold_until=lambda: True):
    async def produce() -> tuple[bytes, bytes]:  # (bytes to cache, the item handed back)
        calls.append(time.monotonic())
        await until(hold_until)  # generating until the situation under test has arisen (at least one yield)
        return value, value

    return produce


async def until(condition, timeout_s: float = 60.0) -> None:
    """Yield to the loop until `condition()` holds: the tests wait for an event, never for a guessed time. The
    deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        await asyncio.sleep(0.01)
        if condition():
            return
        assert time.monotonic() < deadline, "timed out waiting for a condition"


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
        # The leader holds the lock until the other replica's leader is waiting for it: that is the case under
        # test, forced rather than hoped for with a delay (a busy machine can take longer than any delay).
        produce = producer(calls, b"adapter", lambda: cache_lock_waits(a.metrics) + cache_lock_waits(b.metrics) == 1)
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
    lock_key, dead = f"{prefix}lock:gen:k", b"dead-replica-token"

    async def scenario():
        cache = replica_cache(prefix, lock_ttl_s=DEAD_LOCK_TTL_S)
        real_lock = cache.backend.lock

        def lock_taken_by_a_dead_replica(name, ttl_s):
            # A replica that took the lock and died: nobody will release it, and nothing gets cached. Taken just
            # before this cache asks (not before the test started), so it has not expired by then on a slow machine.
            client.set(lock_key, dead, px=int(DEAD_LOCK_TTL_S * 1000))
            return real_lock(name, ttl_s)

        cache.backend.lock = lock_taken_by_a_dead_replica
        calls, held_while_generating = [], []

        def lock_holder() -> bool:
            held_while_generating.append(client.get(lock_key))
            return True

        try:
            item, status = await cache.get_or_create("k", producer(calls, b"v", lock_holder), load)
        finally:
            await cache.close()
        return item, status, calls, held_while_generating, cache.metrics

    item, status, calls, held, metrics = asyncio.run(scenario())
    assert (item, status, len(calls)) == (b"v", "miss", 1)
    assert cache_lock_waits(metrics) == 1, "it generated without waiting for the lock"
    # It generated under a lock of its own, which Redis grants only once the dead one expired: it waited for the
    # expiry (not for its own wait limit, after which it would generate holding no lock).
    assert held[0] not in (None, dead), held
    assert client.get(lock_key) is None, "the lock is released after generating"


def test_a_failed_generation_releases_the_lock_for_the_other_replica(prefix):
    async def scenario():
        a, b = replica_cache(prefix), replica_cache(prefix)
        calls: list = []
        a_holds_the_lock = asyncio.Event()

        async def failing() -> tuple[bytes, bytes]:
            calls.append("a")
            a_holds_the_lock.set()
            await until(lambda: cache_lock_waits(b.metrics) == 1)  # fail only once b waits for a's lock
            raise RuntimeError("generation failed")

        async def b_later():
            await a_holds_the_lock.wait()  # b arrives while a holds the lock
            return await b.get_or_create("k", producer(calls, b"from-b"), load)

        try:
            outcome = await asyncio.gather(a.get_or_create("k", failing, load), b_later(), return_exceptions=True)
        finally:
            await _close(a, b)
        return outcome, calls

    (a_result, b_result), calls = asyncio.run(scenario())
    assert isinstance(a_result, RuntimeError)
    assert b_result == (b"from-b", "miss") and calls[0] == "a" and len(calls) == 2


def test_a_replica_whose_read_just_preceded_the_other_s_write_does_not_generate_again(prefix):
    """The narrow interleaving a busy machine widens: b reads (a miss), then a generates, stores and releases its
    lock, then b takes the lock without waiting. b must read again under the lock, not generate a second time."""
    async def scenario():
        a, b = replica_cache(prefix), replica_cache(prefix)
        calls: list = []
        real_get = b.backend.get

        async def miss_then_let_a_finish(key: str):
            value = await real_get(key)
            if key == "gen:k" and not calls:  # b's first read missed; a runs its whole generation meanwhile
                await a.get_or_create("k", producer(calls, b"from-a"), load)
            return value

        b.backend.get = miss_then_let_a_finish
        try:
            result = await b.get_or_create("k", producer(calls, b"from-b"), load)
        finally:
            await _close(a, b)
        return result, calls, b.metrics

    (item, status), calls, metrics = asyncio.run(scenario())
    assert len(calls) == 1, f"{len(calls)} generations for one key on two replicas"
    assert (item, status) == (b"from-a", "hit") and cache_lock_waits(metrics) == 0


def test_with_redis_down_each_process_still_generates_once(prefix):
    async def scenario():
        cache = replica_cache(prefix, CLOSED_PORT_URL)
        calls: list = []
        try:
            # The followers find the leader's entry at its first await (its connection attempt): no delay needed.
            results = await asyncio.gather(*(cache.get_or_create("k", producer(calls, b"v"), load)
                                             for _ in range(4)))
        finally:
            await cache.close()
        return calls, results, cache.metrics

    calls, results, metrics = asyncio.run(scenario())
    assert len(calls) == 1, "local single-flight holds without Redis"
    assert [r for r, _ in results] == [b"v"] * 4
    assert sum(s.value for f in metrics.cache_errors.collect() for s in f.samples if s.name.endswith("_total")) >= 1
