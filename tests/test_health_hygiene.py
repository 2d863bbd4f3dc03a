"""Probes and error bodies tell operators the truth without leaking server details: a failed background load
turns liveness red (so the process is restarted), and no body names the store's absolute path."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from tests.test_service_support import settings_for


def test_a_failed_background_load_fails_liveness_and_names_no_path(tiny_build):
    from app.main import create_app
    from app.ml.store import StoreError

    app = create_app(settings_for(tiny_build.out, redis_url=None, load_in_background=True))
    store_path = str(tiny_build.out)

    def broken_load():
        app.state.engine.load_error = f"StoreError: {store_path}/manifest.json: damaged"
        raise StoreError(f"{store_path}/manifest.json: damaged")

    app.state.engine.load = broken_load
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health/live").status_code == 200:
            assert time.monotonic() < deadline, "liveness stayed green after the load failed"
            time.sleep(0.05)
        live, ready = client.get("/health/live"), client.get("/health/ready")
        r = client.post("/generate-lora", json={"description": "a photo of a red circle"})
    assert live.status_code == 503 and live.json()["status"] == "failed"
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert r.status_code == 503 and r.headers["retry-after"]
    for body in (live.text, ready.text, r.text):
        assert store_path not in body and "StoreError" in body


def test_readiness_names_no_path_while_loading(tiny_build):
    from app.main import create_app

    app = create_app(settings_for(tiny_build.out, redis_url=None))
    r = TestClient(app).get("/health/ready")  # no lifespan: not loaded
    assert r.status_code == 503 and str(tiny_build.out) not in r.text and r.json()["status"] == "loading"
