"""The OpenAPI document is complete and true: schemathesis (positive and negative data, bounded) against
`python -m app` finds no failure, and the document states what the service really does."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.conftest import ASSETS
from tests.test_service_support import Server

# Per operation and phase: bounded (about a minute in all on 2 busy cores). Deterministic: one seed, so a
# failure reproduces with the command printed in the assertion message.
EXAMPLES = 20


@pytest.fixture(scope="module", params=["test-key", None], ids=["api-key", "no-api-key"])
def server(request, tiny_build, tmp_path_factory):
    # A small body limit and pixel cap keep generated requests cheap. With a key the security scheme is
    # exercised; without one, no route may ask for it.
    key = {"api_key": request.param} if request.param else {}
    with Server(tiny_build.out, tmp_path_factory.mktemp("schemathesis"), max_body_bytes=65536,
                max_image_pixels=64 * 64, **key) as server:
        server.api_key = request.param
        yield server


def test_schemathesis_finds_no_failure(server, tmp_path):
    """Every check schemathesis has (server errors, status codes and content types and headers as documented,
    response schemas, negative data rejected, auth enforced, unsupported methods), positive and negative data.
    Its CLI, not its pytest plugin: the plugin does not run under this pytest (9.x)."""
    key = ["--header", f"X-API-Key: {server.api_key}"] if server.api_key else []
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ASSETS / "schemathesis.toml"),
               "run", server.url + "/openapi.json",
               "--checks", "all", "--mode", "all", "--max-examples", str(EXAMPLES), "--seed", "1",
               "--generation-deterministic", "--no-shrink", *key,
               "--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = "\n".join(line[:300] for line in result.stdout.splitlines())  # payloads can be huge
    assert result.returncode == 0, f"{' '.join(command)}\n{report[-8000:]}\n{result.stderr[-2000:]}"
    summary = result.stdout[-3000:]
    assert "generated" in summary  # it did run cases


def test_the_document_declares_errors_security_enums_and_bounds(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert {op["operationId"] for op in ops.values()} >= {"generate_lora", "download_adapter", "retrieve",
                                                           "experts", "health_live", "health_ready"}
    generate = ops[("/generate-lora", "post")]
    assert set(generate["responses"]) >= {"200", "400", "413", "415", "422", "503"}
    assert generate["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorEnvelope")
    assert "Retry-After" in generate["responses"]["503"]["headers"]
    schemes = doc["components"].get("securitySchemes", {})
    if server.api_key:
        assert generate["security"] == [{"ApiKey": []}, {"BearerAuth": []}] and "401" in generate["responses"]
        assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                     "description": "required when the server sets SGLORA_API_KEY"}
        assert schemes["BearerAuth"] | {"description": ""} == {"type": "http", "scheme": "bearer", "description": ""}
    else:  # no key configured: no route asks for one, none answers 401
        assert not [op for op in ops.values() if {"ApiKey": []} in op.get("security", [])
                    or {"BearerAuth": []} in op.get("security", [])]
        assert "401" not in generate["responses"]
        assert "ApiKey" not in schemes and "BearerAuth" not in schemes
    q = next(p for p in ops[("/experts", "get")]["parameters"] if p["name"] == "q")["schema"]["anyOf"][0]
    assert q["minLength"] == 1 and q["maxLength"] == 500 and q["pattern"]  # ?q= is refused, and says so
    assert "404" in ops[("/adapters/{adapter_id}", "get")]["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    options = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "sglora" in options["strategy"]["anyOf"][0]["enum"]
    assert options["num_samples"]["maximum"] == 8 and options["k"]["anyOf"][0]["maximum"] == 40  # settings, library
    body = ops[("/retrieve", "post")]["requestBody"]["content"]
    for media in ("application/json", "multipart/form-data"):
        props = body[media]["schema"]["properties"]
        assert props["texts"]["maxItems"] == 256 and props["images"]["maxItems"] == 64
    props = body["application/json"]["schema"]["properties"]
    assert props["images"]["minItems"] == 1 and props["texts"]["minItems"] == 1
    assert props["texts"]["items"]["pattern"] == "^[^\\u0000]*\\S[^\\u0000]*$"  # no empty caption, no NUL
    assert body["multipart/form-data"]["encoding"]["images"]["contentType"] == "image/jpeg, image/png, image/webp"
