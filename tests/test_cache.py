"""The cache is an accelerator, not a dependency: real Redis on 127.0.0.1:6379 (own key prefix), a closed port,
corrupt entries, single-flight, and the in-process LRU default."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis.asyncio as aioredis

from app.core.metrics import Metrics
from app.services import adapters as adapters_module
from app.services.cache import Cache, LRUBackend, RedisBackend, cache_key
from tests.test_service_support import CLOSED_PORT_URL, REDIS_URL, metric, png_b64, redis_client, serving, settings_for


@pytest.fixture(scope="module")
def served(tiny_build):
    settings = settings_for(tiny_build.out, redis_backoff_s=0.0)
    with serving(settings) as client:
        yield client, settings, tiny_build


def gen_key(settings, client, description, strategy="topk_weighted", k=4, tau=0.05, seed=0, num_samples=1) -> str:
    version = client.get("/health/ready").json()["store_version"]
    return settings.redis_prefix + "gen:" + cache_key(description, strategy, k, tau, seed, num_samples, version)


def post(client, description, strategy="topk_weighted", **extra):
    # K and τ explicit: unset, they are the store's validated ones, and gen_key would have to look them up
    body = {"description": description, "strategy": strategy, "k": 4, "tau": 0.05} | extra
    r = client.post("/generate-lora", json=body)
    assert r.status_code == 200, r.text
    return r


def test_entries_live_in_redis_with_a_ttl(served):
    client, settings, _ = served
    r = post(client, "a photo of an orange ring")
    redis = redis_client()
    key = gen_key(settings, client, "a photo of an orange ring")
    assert redis.get(key) == r.content
    assert 0 < redis.ttl(key) <= settings.cache_ttl_s
    adapter_key = settings.redis_prefix + "adapter:" + r.headers["x-adapter-id"]
    assert redis.get(adapter_key) == r.content and 0 < redis.ttl(adapter_key) <= settings.cache_ttl_s


def test_a_hit_extends_the_ids_ttl_and_uploads_the_adapter_only_when_it_is_gone(served, monkeypatch):
    client, settings, _ = served
    description = "a photo of a teal cross"
    first = post(client, description)
    adapter_key = settings.redis_prefix + "adapter:" + first.headers["x-adapter-id"]
    redis = redis_client()
    redis.expire(adapter_key, 60)
    backend = client.app.state.cache.backend
    uploads, upload = [], backend.set_many_durably

    async def counted(items, ttl_s):
        uploads.append(sorted(items))
        await upload(items, ttl_s)

    monkeypatch.setattr(backend, "set_many_durably", counted)
    hit = post(client, description)
    assert hit.headers["x-cache"] == "hit" and hit.headers["x-adapter-id"] == first.headers["x-adapter-id"]
    assert uploads == []  # the id was still stored: only its TTL moved
    assert 60 < redis.ttl(adapter_key) <= settings.cache_ttl_s
    redis.delete(adapter_key)  # evicted behind the service's back: the next hit must store it again
    again = post(client, description)
    assert again.headers["x-cache"] == "hit" and again.headers["x-adapter-downloadable"] == "true"
    assert uploads == [["adapter:" + first.headers["x-adapter-id"]]]
    assert redis.get(adapter_key) == first.content
    assert client.get(f"/adapters/{first.headers['x-adapter-id']}").content == first.content


def test_a_miss_admission_would_refuse_is_refused_before_the_shared_lock_and_a_hit_is_still_served(served,
                                                                                                   monkeypatch):
    """Overload forced: every model slot taken and no queue. The refused miss must not take the generation lock (its
    round trips are most of what a refusal costs), and a hit, which needs no model slot, is still answered."""
    client, _, _ = served
    post(client, "a photo of a lime star")  # cached before the overload
    backend, admission = client.app.state.cache.backend, client.app.state.admission
    locks, lock = [], backend.lock

    def counted_lock(name, ttl_s):
        locks.append(name)
        return lock(name, ttl_s)

    monkeypatch.setattr(backend, "lock", counted_lock)
    held, queue = admission._held, admission.queue
    admission._held, admission.queue = admission.limit, 0
    try:
        refused = client.post("/generate-lora", json={"description": "a photo of a never seen lime ring",
                                                      "strategy": "topk_weighted", "k": 4, "tau": 0.05})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "at its limit" in refused.json()["error"]["message"]
        assert locks == []
        assert post(client, "a photo of a lime star").headers["x-cache"] == "hit"
    finally:
        admission._held, admission.queue = held, queue
    assert post(client, "a photo of a never seen lime ring").headers["x-cache"] == "miss"
    assert len(locks) == 1


def _with_metadata(data: bytes, **changes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] |= changes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


CORRUPTIONS = {
    "garbage": lambda good: b"not a safetensors file",
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "other layout": lambda good: _with_metadata(good, layout_hash="0123456789abcdef"),
    "other store": lambda good: _with_metadata(good, store_version="000000000000"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_entry_is_regenerated_and_overwritten(served, corruption):
    client, settings, _ = served
    description = f"a photo of a {corruption} thing"
    good = post(client, description).content
    key = gen_key(settings, client, description)
    redis = redis_client()
    redis.set(key, CORRUPTIONS[corruption](good))
    corrupt0 = metric(client, "sglora_cache_corrupt_total")

    again = post(client, description)
    assert again.headers["x-cache"] == "miss" and again.content == good  # regenerated, same adapter
    assert metric(client, "sglora_cache_corrupt_total") == corrupt0 + 1
    assert redis.get(key) == good  # overwritten
    assert post(client, description).headers["x-cache"] == "hit"


def test_redis_on_a_closed_port_degrades_to_misses(tiny_build):
    settings = settings_for(tiny_build.out, redis_url=CLOSED_PORT_URL, redis_backoff_s=0.0)
    with serving(settings) as client:
        assert client.get("/health/ready").status_code == 200  # readiness does not depend on Redis
        errors0 = metric(client, "sglora_cache_errors_total", backend="redis")
        for _ in range(2):
            r = post(client, "a photo of a red circle")
            assert r.headers["x-cache"] == "miss"
        desc = client.post("/retrieve", json={"images": [png_b64(_image())], "texts": ["a", "b"],
                                              "description": "a photo of a red circle"})
        assert desc.status_code == 200 and desc.json()["adapter"]["cache"] == "miss"
        assert metric(client, "sglora_cache_errors_total", backend="redis") >= errors0 + 3
        assert metric(client, "sglora_cache_errors_total", backend="redis", op="get") >= 3
        assert client.get("/health/ready").json()["cache_degraded"] is False  # backoff 0: retried every call


def test_redis_lost_mid_test_then_back(served):
    client, settings, _ = served
    cache = client.app.state.cache
    first = post(client, "a photo of a purple cross")
    working = cache.backend.client
    errors0 = metric(client, "sglora_cache_errors_total", backend="redis")
    cache.backend.client = aioredis.Redis.from_url(CLOSED_PORT_URL, socket_timeout=0.25,
                                                   socket_connect_timeout=0.25)
    try:
        during = post(client, "a photo of a purple cross")
        assert during.headers["x-cache"] == "miss" and during.content == first.content
        r = client.post("/retrieve", json={"images": [png_b64(_image())], "texts": ["a"],
                                           "description": "a photo of a purple cross"})
        assert r.status_code == 200
        assert metric(client, "sglora_cache_errors_total", backend="redis") > errors0
    finally:
        cache.backend.client = working
    assert post(client, "a photo of a purple cross").headers["x-cache"] == "hit"


def test_backoff_skips_a_failing_backend_for_a_while(tiny_build):
    settings = settings_for(tiny_build.out, redis_url=CLOSED_PORT_URL, redis_backoff_s=60.0)
    with serving(settings) as client:
        post(client, "a photo of a red circle")
        plain = {op: metric(client, "sglora_cache_errors_total", backend="redis", op=op) for op in ("get", "set")}
        stores = metric(client, "sglora_cache_errors_total", backend="redis", op="store")
        assert sum(plain.values()) >= 1 and client.get("/health/ready").json()["cache_degraded"] is True
        r = post(client, "a photo of a red circle")
        for op, before in plain.items():  # the cache's own reads and writes are skipped, not retried
            assert metric(client, "sglora_cache_errors_total", backend="redis", op=op) == before
        assert metric(client, "sglora_cache_bypassed_total") >= 1
        # ... but the id the response hands out is always attempted (and, failing, declared not downloadable)
        assert metric(client, "sglora_cache_errors_total", backend="redis", op="store") == stores + 1
        assert r.headers["x-adapter-downloadable"] == "false"


def test_concurrent_misses_of_one_key_generate_once(served, monkeypatch):
    client, _, _ = served
    calls, lock = [], threading.Lock()
    real = adapters_module.generate_files
    coalesced = client.app.state.metrics.cache_coalesced
    coalesced0 = coalesced._value.get()

    def slow_generate(engine, params, *rest):  # rest: whatever else generate_files takes (query, store)
        with lock:
            calls.append(params)
        # Keep the first generation in flight until the three others have joined it (not for a guessed 0.5 s: on
        # a busy machine a request can arrive later than that, and then it is a plain hit, not a coalesced one).
        deadline = time.monotonic() + 60
        while coalesced._value.get() < coalesced0 + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(engine, params, *rest)

    monkeypatch.setattr(adapters_module, "generate_files", slow_generate)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: post(client, "a photo of a single flight", strategy="sglora"), range(4)))
    assert len(calls) == 1
    assert len({r.content for r in results}) == 1
    assert sorted(r.headers["x-cache"] for r in results) == ["hit", "hit", "hit", "miss"]
    assert metric(client, "sglora_cache_coalesced_total") == coalesced0 + 3


def test_in_process_lru_is_the_default_without_redis(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None)) as client:
        assert client.app.state.cache.backend.name == "lru"
        first = post(client, "a photo of a red circle")
        second = post(client, "a photo of a red circle")
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert first.content == second.content
        assert client.get(f"/adapters/{first.headers['x-adapter-id']}").content == first.content
        assert metric(client, "sglora_cache_hits_total", backend="lru") == 1


# ------------------------------------------------------------------------------------------- unit level


def test_cache_key_normalises_the_description_and_covers_every_parameter():
    base = dict(description="A photo  of a cat", strategy="sglora", k=4, tau=0.05, seed=0, num_samples=1,
                store_version="v1")
    key = cache_key(**base)
    assert cache_key(**(base | {"description": "  a PHOTO of a cat\n"})) == key
    for change in ({"description": "a photo of a dog"}, {"strategy": "topk_weighted"}, {"k": 3}, {"tau": 0.1},
                   {"seed": 1}, {"num_samples": 2}, {"store_version": "v2"}):
        assert cache_key(**(base | change)) != key, change


def test_more_calls_in_flight_than_pooled_connections_wait_for_one_instead_of_failing():
    """Every call starts before any reply can arrive (the loop polls sockets only once the ready tasks have run), so
    20 calls on a 2-connection pool are 18 past its bound: they wait for a free connection. A pool that refused
    them would count cache errors and put the cache in backoff, turning hits into generations."""
    prefix = f"sglora-test:{uuid.uuid4().hex[:8]}:"

    async def scenario():
        backend = RedisBackend(REDIS_URL, prefix, socket_timeout_s=5.0, connect_timeout_s=5.0, max_connections=2)
        cache = Cache(backend, Metrics(), ttl_s=60)
        try:
            assert await cache.store_durably("adapter", {"one": b"1"})
            got = await asyncio.gather(*(cache.get("adapter", "one") for _ in range(20)),
                                       *(cache.store_durably("adapter", {"one": b"1"}, keep_existing=True)
                                         for _ in range(20)))
            assert got == [b"1"] * 20 + [True] * 20
            assert not cache.degraded
            assert backend.client.connection_pool.max_connections == 2
        finally:
            await backend.client.delete(prefix + "adapter:one")
            await backend.close()

    asyncio.run(scenario())


def test_lru_backend_is_bounded_and_expires():
    async def scenario():
        lru = LRUBackend(max_entries=2)
        await lru.set("a", b"1", 60)
        await lru.set("b", b"2", 60)
        assert await lru.get("a") == b"1"  # a is now most recent
        await lru.set("c", b"3", 60)
        assert await lru.get("b") is None and await lru.get("a") == b"1" and await lru.get("c") == b"3"
        await lru.set("d", b"4", 0)
        await asyncio.sleep(0.01)
        assert await lru.get("d") is None

    asyncio.run(scenario())


def test_single_flight_shares_failures_and_does_not_cache_them():
    async def scenario():
        cache = Cache(LRUBackend(8), Metrics(), ttl_s=60)
        calls = 0

        async def failing():
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            raise RuntimeError("boom")

        async def load(value):
            return value.decode()

        results = await asyncio.gather(*(cache.get_or_create("k", failing, load) for _ in range(3)),
                                       return_exceptions=True)
        assert calls == 1 and all(isinstance(r, RuntimeError) for r in results)

        async def ok():
            return b"value", "value"

        assert await cache.get_or_create("k", ok, load) == ("value", "miss")
        assert await cache.get_or_create("k", ok, load) == ("value", "hit")

    asyncio.run(scenario())


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))
