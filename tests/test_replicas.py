"""Stateless replicas: two real uvicorn processes (`uvicorn app.main:app`, this tree's code) on two ports, one real
Redis, one read-only store; nginx in front with the repo's deploy/nginx/sglora.conf when an nginx binary is
installed (apt-get install nginx-light).

- a generation on one replica is a cache hit on the other (same id, same bytes);
- concurrent misses of one key spread over both replicas generate once (the Redis generation lock);
- an adapter id handed out by one replica downloads from the other;
- through nginx, requests reach both replicas and behave the same;
- a store version switch (the version pointer moves, SGLORA_STORE_WATCH_S) is picked up by both replicas, each
  response made wholly by one version (its trace routes only to that version's experts), and the cache never
  serves an adapter of the old version for the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from app.services.generator import read_metadata
from offline.import_experts import remove_experts

from .conftest import copy_tiny_store
from .live_server import announced_url, free_port
from .test_deploy import nginx_executable, nginx_main_config
from .test_service_support import REDIS_URL, drop_prefix, redis_client, redis_timeout_env

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240  # two processes loading torch + the store on 2 shared cores


def spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A server process whose output goes to a file (a pipe nobody reads would block it once full)."""
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    process.log = log
    return process


def wait_ready(url: str, process: subprocess.Popen, deadline: float, path: str = "/health/ready") -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}: {process.log.read_text()[-3000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not ready after {START_TIMEOUT_S}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_replica(store: Path, prefix: str, log: Path) -> subprocess.Popen:
    """A replica on a port it binds itself (port 0, read back from its log with announced_url)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLORA_")}
    env |= {"PYTHONPATH": str(ROOT), "SGLORA_STORE_PATH": str(store), "SGLORA_DEVICE": "cpu",
            "SGLORA_REDIS_URL": REDIS_URL, "SGLORA_REDIS_PREFIX": prefix, "OMP_NUM_THREADS": "1",
            "SGLORA_STORE_WATCH_S": "0.2"} | redis_timeout_env()  # a timed-out lock call would skip the lock
    return spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", "0",
                  "--log-level", "info", "--no-access-log"], log, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def replicas(tiny_build, tmp_path_factory):
    """(url of replica A, url of replica B, url of nginx in front of both or None, the shared store)."""
    redis_client()  # fails the test with a clear message when no Redis answers
    # a copy: the last test publishes a new version into it
    store = copy_tiny_store(tiny_build, tmp_path_factory.mktemp("shared") / "store")
    prefix = f"sglora-test-replicas:{uuid.uuid4().hex[:12]}:"
    logs = tmp_path_factory.mktemp("replica-logs")
    with ExitStack() as stack:
        stack.callback(drop_prefix, prefix)
        processes = []
        for name in ("a", "b"):
            processes.append(start_replica(store, prefix, logs / f"uvicorn-{name}.log"))
            stack.callback(stop, processes[-1])
        deadline = time.monotonic() + START_TIMEOUT_S
        urls = [announced_url(p, p.log, max(1.0, deadline - time.monotonic())) for p in processes]
        for url, process in zip(urls, processes, strict=True):
            wait_ready(url, process, deadline)
        proxy = None
        nginx = nginx_executable()
        if nginx is not None:
            workdir = tmp_path_factory.mktemp("nginx")
            port = free_port()
            config = nginx_main_config(workdir, [u.removeprefix("http://") for u in urls], listen=port)
            process = spawn([nginx, "-p", str(workdir), "-c", str(config)], logs / "nginx.log")
            stack.callback(stop, process)
            proxy = f"http://127.0.0.1:{port}"
            wait_ready(proxy, process, time.monotonic() + 30, path="/nginx-health")
        yield urls[0], urls[1], proxy, store


def counter(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def generate(url: str, description: str, **extra) -> httpx.Response:
    body = {"description": description, "strategy": "sglora", "seed": 0} | extra
    response = httpx.post(url + "/generate-lora", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_a_generation_on_one_replica_is_a_cache_hit_on_the_other(replicas):
    a, b, _, _ = replicas
    description = f"a photo of a red circle {uuid.uuid4().hex[:6]}"
    first = generate(a, description)
    second = generate(b, description)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.headers["x-adapter-id"] == second.headers["x-adapter-id"]
    assert first.content == second.content


def test_an_adapter_id_from_one_replica_downloads_from_the_other(replicas):
    a, b, _, _ = replicas
    response = httpx.post(a + "/generate-lora", headers={"accept": "application/json"}, timeout=120,
                          json={"description": f"a photo of a blue star {uuid.uuid4().hex[:6]}", "num_samples": 3})
    assert response.status_code == 200, response.text
    ids = response.json()["adapter_ids"]
    assert len(set(ids)) == 3
    for adapter_id in ids:
        download = httpx.get(f"{b}/adapters/{adapter_id}", timeout=30)
        assert download.status_code == 200, download.text
        assert hashlib.sha256(download.content).hexdigest() == adapter_id


def test_concurrent_misses_across_replicas_generate_once(replicas):
    a, b, _, _ = replicas
    before = counter(a, "sglora_generations_total") + counter(b, "sglora_generations_total")
    description = f"a photo of a green ring {uuid.uuid4().hex[:6]}"
    targets = [a, b] * 4  # 8 requests for one key, 4 on each replica, all in flight together
    with ThreadPoolExecutor(len(targets)) as pool:
        responses = list(pool.map(lambda url: generate(url, description, num_samples=4), targets))
    after = counter(a, "sglora_generations_total") + counter(b, "sglora_generations_total")
    assert after - before == 1, f"{after - before:.0f} generations for one key across two replicas"
    assert len({r.headers["x-adapter-id"] for r in responses}) == 1
    assert [r.headers["x-cache"] for r in responses].count("miss") == 1


def test_through_nginx_both_replicas_serve(replicas):
    a, b, proxy, _ = replicas
    if proxy is None:
        pytest.skip("no nginx binary here (apt-get install nginx-light): the replicas were tested directly")
    description = f"a photo of a yellow cross {uuid.uuid4().hex[:6]}"
    served = [counter(u, "sglora_http_requests_total") for u in (a, b)]
    responses = [generate(proxy, description) for _ in range(6)]
    assert [r.headers["x-cache"] for r in responses] == ["miss"] + ["hit"] * 5
    assert len({r.headers["x-adapter-id"] for r in responses}) == 1
    download = httpx.get(f"{proxy}/adapters/{responses[0].headers['x-adapter-id']}", timeout=30)
    assert download.status_code == 200 and download.content == responses[0].content
    # Round robin: each replica answered some of the proxied requests (the metrics scrapes add one each).
    grew = [counter(u, "sglora_http_requests_total") - before for u, before in zip((a, b), served, strict=True)]
    assert all(g >= 2 for g in grew), f"requests per replica through nginx: {grew}"


def served_version(url: str) -> str:
    return httpx.get(url + "/health/ready", timeout=10).json()["store_version"]


def test_both_replicas_follow_a_store_version_switch(replicas):  # last: it publishes a new version of the store
    a, b, _, store = replicas
    old = served_version(a)
    assert served_version(b) == old
    description = "a photo of a red circle"
    before = generate(a, description, strategy="topk_weighted")
    victim = json.loads(read_metadata(before.content)["trace"])["expert_ids"][0]
    new = remove_experts(store, [victim])["version"]  # the version pointer moves; nobody calls the replicas
    deadline = time.monotonic() + 60
    while {served_version(a), served_version(b)} != {new} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served_version(a) == served_version(b) == new != old

    after_a = generate(a, description, strategy="topk_weighted")
    after_b = generate(b, description, strategy="topk_weighted")
    assert (after_a.headers["x-cache"], after_b.headers["x-cache"]) == ("miss", "hit"), "old entries are not reused"
    assert after_a.content == after_b.content
    for response, version in ((before, old), (after_a, new), (after_b, new)):
        metadata = read_metadata(response.content)
        experts = json.loads(metadata["trace"])["expert_ids"]
        assert metadata["store_version"] == response.headers["x-store-version"] == version
        assert (victim in experts) == (version == old), f"{version} routed to {experts}: a mix of versions"
    # An id handed out under the old version still downloads from the other replica.
    old_id = before.headers["x-adapter-id"]
    assert httpx.get(f"{b}/adapters/{old_id}", timeout=30).content == before.content
