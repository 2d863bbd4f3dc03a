"""Live store updates: a running uvicorn switches to an added expert without a restart while requests run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.ml.store import load_store, read_manifest
from offline.import_experts import add_experts, remove_experts
from tests.live_server import announced_url
from tests.test_import_experts import NEW_DESCRIPTION, peft_folder, store_copy  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "test-admin-key"


@pytest.fixture
def server(store_copy):  # noqa: F811
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "SGLORA_STORE_PATH": str(store_copy), "SGLORA_DEVICE": "cpu", "SGLORA_ADMIN_KEY": ADMIN,
           "OMP_NUM_THREADS": "1"}
    log = open(store_copy.parent / "server.log", "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", "0",
                             "--timeout-graceful-shutdown", "2"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = announced_url(proc, store_copy.parent / "server.log", 120)  # it binds port 0 itself: no race
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError((store_copy.parent / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        else:
            raise TimeoutError("server did not become ready in 120 s")
        yield url, store_copy
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_running_server_picks_up_an_added_expert_while_requests_run(server, tmp_path, tiny_build):
    url, store = server
    old_version = read_manifest(store)["version"]
    results, probes, stop = [], [], threading.Event()

    def request_loop():
        with httpx.Client(base_url=url, timeout=60) as client:
            seed = 0
            while not stop.is_set():
                r = client.post("/generate-lora", headers={"Accept": "application/json"},
                                json={"description": NEW_DESCRIPTION, "strategy": "topk_weighted", "seed": seed})
                body = r.json()
                results.append((r.status_code, r.headers.get("X-Store-Version"),
                                body.get("trace", {}).get("expert_ids", []) if r.status_code == 200 else body))
                probes.append(client.get("/health/ready").status_code)
                seed += 1

    loop = threading.Thread(target=request_loop)
    loop.start()

    def until_results(n: int) -> None:  # a failed request loop or a hung server fails the test, never hangs it
        deadline = time.monotonic() + 120
        while len(results) < n:
            assert loop.is_alive() and time.monotonic() < deadline, f"{len(results)} requests done, waiting for {n}"
            time.sleep(0.05)

    try:
        until_results(3)
        # No key: refused, nothing switches.
        assert httpx.post(f"{url}/admin/reload", timeout=10).status_code == 401
        layout = load_store(store).layout
        new_version = add_experts(store, [peft_folder(tmp_path / "violet-spiral", layout)])["version"]
        switched = httpx.post(f"{url}/admin/reload", headers={"X-Admin-Key": ADMIN}, timeout=120)
        assert switched.status_code == 200, switched.text
        assert switched.json() | {"seconds": None} == {"changed": True, "version": new_version,
                                                        "previous_version": old_version,
                                                        "experts": len(tiny_build.split.seen) + 1, "seconds": None}
        n_after = len(results)  # requests from here on started after the switch
        until_results(n_after + 3)
        again = httpx.post(f"{url}/admin/reload", headers={"X-Admin-Key": ADMIN}, timeout=60).json()
        assert again["changed"] is False and again["version"] == new_version
    finally:
        stop.set()
        loop.join(timeout=60)
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    assert set(probes) == {200}  # readiness never dropped
    versions = [v for _, v, _ in results]
    assert versions[0] == old_version and versions[-1] == new_version
    switch = versions.index(new_version)
    assert set(versions[:switch]) == {old_version} and set(versions[switch:]) == {new_version}  # one clean switch
    assert all("violet-spiral" not in ids for _, _, ids in results[:switch])
    assert all(ids[0] == "violet-spiral" for _, _, ids in results[switch:])  # the new expert is routed to
    experts = httpx.get(f"{url}/experts", timeout=30).json()
    assert experts["store_version"] == new_version and "violet-spiral" in [e["id"] for e in experts["experts"]]

    # A version that fails to load is refused (409 naming the file) and the served one stays.
    remove_experts(store, ["violet-spiral"])
    index_file = store / read_manifest(store)["index"]["file"]
    index_file.write_bytes(index_file.read_bytes()[:-8])
    refused = httpx.post(f"{url}/admin/reload", headers={"X-Admin-Key": ADMIN}, timeout=60)
    assert refused.status_code == 409 and index_file.name in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/health/ready", timeout=10).json()["store_version"] == new_version


def test_watcher_follows_the_version_pointer(store_copy):  # noqa: F811
    """SGLORA_STORE_WATCH_S: no admin call, the server notices the new manifest and switches by itself."""
    from tests.test_service_support import serving, settings_for

    with serving(settings_for(store_copy, store_watch_s=0.2, redis_url=None)) as client:
        before = client.get("/health/ready").json()["store_version"]
        assert client.post("/admin/reload").status_code == 403  # no SGLORA_ADMIN_KEY: admin routes are off
        victim = read_manifest(store_copy)["experts"][0]["id"]
        after = remove_experts(store_copy, [victim])["version"]
        deadline = time.monotonic() + 30
        while client.get("/health/ready").json()["store_version"] != after and time.monotonic() < deadline:
            time.sleep(0.1)
        assert before != after == client.get("/health/ready").json()["store_version"]
        assert victim not in [e["id"] for e in client.get("/experts", params={"limit": 1000}).json()["experts"]]
