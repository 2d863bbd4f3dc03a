"""Shared helpers for the service tests (no tests here): apps on the tiny store, Redis key isolation, images."""

from __future__ import annotations

import base64
import io
import uuid
from contextlib import contextmanager

import pytest
import redis
from fastapi.testclient import TestClient

REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once


def settings_for(store, **overrides):
    from app.core.config import Settings

    return Settings(**({"store_path": store, "device": "cpu", "redis_url": REDIS_URL,
                        "redis_prefix": f"sglora-test:{uuid.uuid4().hex[:12]}:", "_env_file": None} | overrides))


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:  # the Makefile and .ci/run start one; a missing server is a setup error
        pytest.fail(f"these tests need a Redis server at {REDIS_URL} (scripts/ensure-redis.sh starts one): {e}")
    return client


def drop_prefix(prefix: str) -> None:
    client = redis_client()
    keys = list(client.scan_iter(match=prefix + "*", count=500))
    if keys:
        client.delete(*keys)


@contextmanager
def serving(settings):
    """A started app (lifespan run) and its client; Redis keys under the settings' prefix are removed after."""
    from app.main import create_app

    app = create_app(settings)
    try:
        with TestClient(app) as client:
            yield client
    finally:
        if settings.redis_url == REDIS_URL:
            drop_prefix(settings.redis_prefix)


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def encode(image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def metric(client, name: str, **labels) -> float:
    """The value of one sample from /metrics (0.0 when the labelled series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
