"""A 200 with an adapter id is a promise: ids handed out right after a Redis restart can be downloaded, and when
Redis really is gone the response says plainly that its ids are not downloadable (never a silent 404 later).
Each test runs its own redis-server (the shared one on 6379 is never restarted)."""

from __future__ import annotations

import pytest

from tests.test_service_support import PrivateRedis, metric, serving, settings_for

JSON = {"Accept": "application/json"}


@pytest.fixture
def private_redis():
    server = PrivateRedis().start()
    try:
        yield server
    finally:
        server.stop()


def generate(client, description, **extra):
    r = client.post("/generate-lora", json={"description": description, "strategy": "topk_weighted"} | extra,
                    headers=JSON)
    assert r.status_code == 200, r.text
    return r.json()


def test_ids_handed_out_right_after_a_redis_restart_can_be_downloaded(tiny_build, private_redis):
    # A long backoff: before the fix, the first error after the restart skipped every write for this long.
    settings = settings_for(tiny_build.out, redis_url=private_redis.url, redis_backoff_s=30.0)
    with serving(settings) as client:
        generate(client, "a photo of a warm-up square")  # pooled connections now exist ...
        private_redis.stop()  # ... and die: a request while Redis is really down is what the cache must see
        outage = generate(client, "a photo of an outage square")
        assert client.get("/health/ready").json()["cache_degraded"] is True  # the plain cache saw the error
        assert outage["downloadable"] is False  # nothing could store its id: the response says so
        private_redis.start()  # back on the same port, while the plain cache still backs off for 30 s
        bodies = [generate(client, f"a photo of restart shape number {i}") for i in range(10)]
        bodies.append(generate(client, "a photo of restart samples", strategy="sglora", num_samples=3))
        assert client.get("/health/ready").json()["cache_degraded"] is True  # still backing off: ids bypass it
        for body in bodies:
            assert body["downloadable"] is True and body["download_url"] == f"/adapters/{body['adapter_id']}"
            for adapter_id in body["adapter_ids"]:
                r = client.get(f"/adapters/{adapter_id}")
                assert r.status_code == 200, (adapter_id, r.text)
        assert len(bodies[-1]["adapter_ids"]) == 3
        assert metric(client, "sglora_adapter_ids_not_stored_total") == 1  # the outage's, and only it


def test_a_response_says_plainly_when_its_ids_cannot_be_stored(tiny_build, private_redis):
    settings = settings_for(tiny_build.out, redis_url=private_redis.url, redis_backoff_s=30.0)
    with serving(settings) as client:
        private_redis.stop()
        body = generate(client, "a photo of an unstored star")
        assert body["downloadable"] is False and body["download_url"] is None
        r = client.post("/generate-lora", json={"description": "a photo of an unstored star",
                                                "strategy": "topk_weighted"})
        assert r.status_code == 200 and r.headers["x-adapter-downloadable"] == "false"
        assert r.headers["x-adapter-id"] == body["adapter_id"]  # the file itself is in the response
        assert metric(client, "sglora_adapter_ids_not_stored_total") == 2


def test_download_url_ignores_the_host_header(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None, public_url="https://sglora.example/api")) as client:
        body = client.post("/generate-lora", json={"description": "a photo of a host", "strategy": "topk_weighted"},
                           headers=JSON | {"Host": "evil.example"}).json()
        assert body["download_url"] == f"https://sglora.example/api/adapters/{body['adapter_id']}"
