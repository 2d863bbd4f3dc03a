"""Every route's OpenAPI examples exist, the request examples are accepted by the app, and the response examples
fit the response models (app/api/examples.py): the documented shapes are the served shapes."""

from __future__ import annotations

import io
import zipfile

import pytest

from app.api.examples import EXAMPLES
from app.schemas import ExpertsResponse, GenerateResponse, Health, ReloadResponse, RetrieveResponse
from tests.test_service_support import serving, settings_for

RESPONSE_MODELS = {("/generate-lora", "post"): GenerateResponse, ("/adapters/{adapter_id}", "get"): GenerateResponse,
                   ("/retrieve", "post"): RetrieveResponse, ("/experts", "get"): ExpertsResponse,
                   ("/health/live", "get"): Health, ("/health/ready", "get"): Health,
                   ("/admin/reload", "post"): ReloadResponse}


@pytest.fixture(scope="module")
def client(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None)) as client:
        yield client


def test_every_route_has_examples(client):
    schema = client.get("/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            where = f"{method.upper()} {path} (add it to app/api/examples.py)"
            ok = op["responses"]["200"]["content"]
            assert any("example" in c for c in ok.values()), f"{where}: no 200 response example"
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                assert content.get("examples"), f"{where}: no request example for {media}"
            for param in op.get("parameters", []):
                if param["in"] in ("path", "query"):
                    assert "example" in param, f"{where}: no example for parameter {param['name']}"
    assert set(EXAMPLES) == {(p, m) for p, ms in schema["paths"].items() for m in ms}


@pytest.mark.parametrize("route", sorted(EXAMPLES))
def test_response_examples_fit_the_response_models(route):
    for media in EXAMPLES[route]["responses"].values():
        RESPONSE_MODELS[route].model_validate(media["application/json"])


def test_request_examples_are_accepted(client):
    for named in EXAMPLES[("/generate-lora", "post")]["request"]["application/json"].values():
        r = client.post("/generate-lora", json=named["value"], params={"format": "peft"})
        assert r.status_code == 200, r.text
        assert zipfile.is_zipfile(io.BytesIO(r.content))
    for named in EXAMPLES[("/retrieve", "post")]["request"]["application/json"].values():
        r = client.post("/retrieve", json=named["value"])
        assert r.status_code == 200, r.text
        RetrieveResponse.model_validate(r.json())
