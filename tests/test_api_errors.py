"""Every bad input is a 4xx JSON error naming the field, never a 500; API key; settings that stop start-up."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.test_service_support import encode, metric, serving, settings_for

LIMITS = dict(max_images=3, max_texts=3, max_image_pixels=64 * 64, max_description_chars=50, max_num_samples=2,
              max_text_chars=40, max_body_bytes=200_000, max_request_pixels=2 * 64 * 64)


@pytest.fixture(scope="module")
def client(tiny_build):
    with serving(settings_for(tiny_build.out, **LIMITS)) as client:
        client.raise_server_exceptions = True  # a 500 fails loudly with its traceback
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(size=(32, 32), fmt="PNG") -> bytes:
    return encode(Image.new("RGB", size, (10, 120, 200)), fmt)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


OK_IMAGE = b64(image())


def retrieve_json(**changes):
    return {"json": {"images": [OK_IMAGE], "texts": ["a photo"]} | changes}


def gen(**body):
    return {"json": {"description": "a photo of a red circle"} | body}


# (name, method, path, request kwargs, status, field)
CASES = [
    ("description missing", "post", "/generate-lora", {"json": {}}, 422, "description"),
    ("description empty", "post", "/generate-lora", gen(description=""), 422, "description"),
    ("description blank", "post", "/generate-lora", gen(description="   \n "), 422, "description"),
    ("description too long", "post", "/generate-lora", gen(description="a" * 51), 422, "description"),
    ("description not a string", "post", "/generate-lora", gen(description=123), 422, "description"),
    ("NUL in description", "post", "/generate-lora", gen(description="a photo\x00"), 422, "description"),
    ("NUL in q", "get", "/experts?q=a%00b", {}, 422, "q"),
    ("blank q", "get", "/experts?q=%20", {}, 422, "q"),
    ("unknown strategy", "post", "/generate-lora", gen(strategy="magic"), 422, "strategy"),
    ("k zero", "post", "/generate-lora", gen(k=0), 422, "k"),
    ("k negative", "post", "/generate-lora", gen(k=-2), 422, "k"),
    ("k over library size", "post", "/generate-lora", gen(k=41), 422, "k"),
    ("k not an int", "post", "/generate-lora", gen(k="four"), 422, "k"),
    ("tau zero", "post", "/generate-lora", gen(tau=0), 422, "tau"),
    ("tau subnormal (softmax overflow)", "post", "/generate-lora", gen(tau=5e-309), 422, "tau"),
    ("tau below the minimum", "post", "/generate-lora", gen(tau=1e-7), 422, "tau"),
    ("lone surrogate in description", "post", "/generate-lora",
     {"content": b'{"description": "a \\ud800 b"}', "headers": {"content-type": "application/json"}}, 422,
     "description"),
    # /retrieve parses with pydantic's strict JSON reader, which refuses the escape itself: a 400, not a 500
    ("lone surrogate in a text", "post", "/retrieve",
     {"content": b'{"images": ["' + OK_IMAGE.encode() + b'"], "texts": ["ok", "a \\udfff"]}',
      "headers": {"content-type": "application/json"}}, 400, None),
    ("seed negative", "post", "/generate-lora", gen(seed=-1), 422, "seed"),
    ("seed too large", "post", "/generate-lora", gen(seed=2**64), 422, "seed"),
    ("num_samples zero", "post", "/generate-lora", gen(num_samples=0), 422, "num_samples"),
    ("num_samples over limit", "post", "/generate-lora", gen(num_samples=3), 422, "num_samples"),
    ("unknown field", "post", "/generate-lora", gen(temperature=1), 422, "temperature"),
    ("body not JSON", "post", "/generate-lora",
     {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    ("body a JSON list", "post", "/generate-lora", {"json": ["a photo"]}, 422, None),
    ("adapter id malformed", "get", "/adapters/not-an-id", {}, 404, "adapter_id"),
    ("adapter id unknown", "get", "/adapters/" + "ab" * 32, {}, 404, "adapter_id"),
    ("unknown route", "get", "/nope", {}, 404, None),
    ("wrong method", "get", "/generate-lora", {}, 405, None),
    # /retrieve, JSON
    ("bad base64", "post", "/retrieve", retrieve_json(images=["!!not base64!!"]), 422, "images[0]"),
    ("data URL not base64", "post", "/retrieve", retrieve_json(images=["data:image/png,xyz"]), 422, "images[0]"),
    ("bytes not an image", "post", "/retrieve", retrieve_json(images=[OK_IMAGE, b64(b"hello world")]), 422,
     "images[1]"),
    ("truncated PNG", "post", "/retrieve", retrieve_json(images=[b64(image()[:60])]), 422, "images[0]"),
    ("GIF", "post", "/retrieve", retrieve_json(images=[b64(image(fmt="GIF"))]), 415, "images[0]"),
    ("BMP", "post", "/retrieve", retrieve_json(images=[b64(image(fmt="BMP"))]), 415, "images[0]"),
    ("TIFF", "post", "/retrieve", retrieve_json(images=[b64(image(fmt="TIFF"))]), 415, "images[0]"),
    ("image over pixel cap", "post", "/retrieve", retrieve_json(images=[b64(image((65, 64)))]), 422, "images[0]"),
    ("decompression bomb", "post", "/retrieve", retrieve_json(images=[b64(png_header_only(30000, 30000))]), 422,
     "images[0]"),
    ("header-only huge PNG", "post", "/retrieve", retrieve_json(images=[b64(png_header_only(5000, 5000))]), 422,
     "images[0]"),
    ("too many images", "post", "/retrieve", retrieve_json(images=[OK_IMAGE] * 4), 422, "images"),
    ("over the request pixel budget", "post", "/retrieve", retrieve_json(images=[b64(image((64, 64)))] * 3), 422,
     "images"),
    ("no images", "post", "/retrieve", retrieve_json(images=[]), 422, "images"),
    ("too many texts", "post", "/retrieve", retrieve_json(texts=["a"] * 4), 422, "texts"),
    ("empty caption", "post", "/retrieve", retrieve_json(texts=["ok", ""]), 422, "texts[1]"),
    ("blank caption", "post", "/retrieve", retrieve_json(texts=[" \t "]), 422, "texts[0]"),
    ("NUL in a caption", "post", "/retrieve", retrieve_json(texts=["a photo\x00of a cat"]), 422, "texts[0]"),
    ("multipart empty caption", "post", "/retrieve",
     {"files": [("images", ("a.png", image(), "image/png"))], "data": {"texts": [""]}}, 422, "texts[0]"),
    ("no texts", "post", "/retrieve", retrieve_json(texts=[]), 422, "texts"),
    ("text too long", "post", "/retrieve", retrieve_json(texts=["ok", "b" * 41]), 422, "texts[1]"),
    ("images missing", "post", "/retrieve", {"json": {"texts": ["a"]}}, 422, "images"),
    ("top_k zero", "post", "/retrieve", retrieve_json(top_k=0), 422, "top_k"),
    ("retrieve unknown adapter", "post", "/retrieve", retrieve_json(adapter_id="cd" * 32), 404, "adapter_id"),
    ("retrieve description and adapter", "post", "/retrieve",
     retrieve_json(description="a photo of a cat", adapter_id="cd" * 32), 422, "adapter_id"),
    ("retrieve empty description", "post", "/retrieve", retrieve_json(description=" "), 422, "description"),
    ("retrieve k over library", "post", "/retrieve", retrieve_json(description="a cat", k=99), 422, "k"),
    ("retrieve unknown strategy", "post", "/retrieve", retrieve_json(description="a cat", strategy="x"), 422,
     "strategy"),
    ("retrieve unsupported content type", "post", "/retrieve",
     {"content": b"images=1", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
    ("retrieve body not JSON", "post", "/retrieve",
     {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, None),
    # /retrieve, multipart
    ("multipart GIF", "post", "/retrieve",
     {"files": [("images", ("a.gif", image(fmt="GIF"), "image/gif"))], "data": {"texts": ["a"]}}, 415, "images[0]"),
    ("multipart not an image", "post", "/retrieve",
     {"files": [("images", ("a.png", b"\x89PNG not really", "image/png"))], "data": {"texts": ["a"]}}, 422,
     "images[0]"),
    ("multipart image not a file", "post", "/retrieve",
     {"files": [("x", ("a.png", image(), "image/png"))], "data": {"texts": ["a"], "images": "abc"}}, 422,
     "images[0]"),
    ("multipart too many files", "post", "/retrieve",
     {"files": [("images", (f"{i}.png", image(), "image/png")) for i in range(4)], "data": {"texts": ["a"]}}, 422,
     "images"),
    ("multipart no texts", "post", "/retrieve",
     {"files": [("images", ("a.png", image(), "image/png"))]}, 422, "texts"),
    ("multipart bad k", "post", "/retrieve",
     {"files": [("images", ("a.png", image(), "image/png"))], "data": {"texts": ["a"], "description": "x",
                                                                       "k": "many"}}, 422, "k"),
    ("multipart unknown field", "post", "/retrieve",
     {"files": [("images", ("a.png", image(), "image/png"))], "data": {"texts": ["a"], "colour": "red"}}, 422,
     "colour"),
    # body limit
    ("body over limit (Content-Length)", "post", "/retrieve", retrieve_json(images=[b64(b"\0" * 160_000)]), 413,
     None),
    ("body over limit (streamed)", "post", "/generate-lora",
     {"content": iter([b'{"description": "', b"a" * 150_000, b"a" * 150_000, b'"}']),
      "headers": {"content-type": "application/json"}}, 413, None),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gets_its_4xx_naming_the_field(client, method, path, kwargs, status, field):
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and error["message"] and error["code"]
    assert error["field"] == field, error
    assert error["details"][0]["field"] == field


def test_pixel_cap_is_checked_before_any_pixel_is_decoded(client, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    big = encode(Image.new("RGB", (200, 200), (1, 2, 3)))  # a complete, valid PNG over the 64x64 cap
    r = client.post("/retrieve", json={"images": [b64(big)], "texts": ["a"]})
    assert r.status_code == 422 and "200x200 = 40000 pixels" in r.json()["error"]["message"]
    assert decoded == []
    assert client.post("/retrieve", json={"images": [OK_IMAGE], "texts": ["a"]}).status_code == 200
    assert decoded and set(decoded) == {(32, 32)}  # the patch does see decoding when it happens


def test_the_request_pixel_budget_is_checked_before_any_pixel_is_decoded(client, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    each = b64(image((64, 64)))  # within the per-image cap; three of them are over the 8192-pixel budget
    r = client.post("/retrieve", json={"images": [each] * 3, "texts": ["a"]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "images" and "12288 pixels" in error["message"]
    assert "SGLORA_MAX_REQUEST_PIXELS" in error["message"] and "8192" in error["message"]
    assert decoded == []
    assert client.post("/retrieve", json={"images": [each] * 2, "texts": ["a"]}).status_code == 200


def test_an_unknown_id_is_not_echoed(client):
    r = client.get("/adapters/" + "x" * 5000)
    assert r.status_code == 404 and "x" * 65 not in r.text and len(r.content) < 500


def test_unknown_strategy_lists_the_valid_ones(client):
    from app.ml.strategies import STRATEGIES

    message = client.post("/generate-lora", json={"description": "x", "strategy": "magic"}).json()["error"]["message"]
    assert all(name in message for name in STRATEGIES)


def test_the_service_still_works_after_the_bad_inputs(client):
    assert client.post("/generate-lora", json={"description": "a photo of a red circle"}).status_code == 200
    r = client.post("/retrieve", json={"images": [OK_IMAGE, b64(image(fmt="JPEG")), b64(image(fmt="WEBP"))],
                                       "texts": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["images"]) == 3  # JPEG, PNG and WebP are all accepted


def test_api_key_when_configured(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None, api_key="s3cret")) as client:
        for headers in ({}, {"X-API-Key": "wrong"}):
            for method, path, kwargs in (("post", "/generate-lora", gen()), ("get", "/experts", {}),
                                         ("post", "/retrieve", retrieve_json()), ("get", "/adapters/" + "a" * 64, {})):
                r = getattr(client, method)(path, headers=headers, **kwargs)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["field"] == "X-API-Key"
        assert client.get("/health/ready").status_code == 200  # probes need no key
        assert client.get("/metrics").status_code == 200
        assert client.get("/experts", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/experts", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        wrong = client.get("/experts", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "Authorization"
        assert client.get("/experts", headers={"Authorization": "Basic s3cret"}).status_code == 401
        # Both metric families count the same requests: sglora's own and Micrometer's http_server_requests.
        refused = metric(client, "sglora_http_requests_total", method="GET", route="/experts", status="401")
        assert refused >= 4 and metric(client, "http_server_requests_seconds_count", method="GET", uri="/experts",
                                       status="401", outcome="CLIENT_ERROR") == refused


def test_cors_allows_the_configured_origin_only(tiny_build):
    from app.main import create_app

    app = create_app(settings_for(tiny_build.out, redis_url=None, cors_origins="https://a.example,https://b.example"))
    client = TestClient(app)  # no lifespan needed: /health/live answers before loading
    ok = client.get("/health/live", headers={"Origin": "https://b.example"})
    assert ok.headers["access-control-allow-origin"] == "https://b.example"
    other = client.get("/health/live", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------ settings


def test_invalid_settings_stop_start_up_with_a_clear_message(tiny_build, monkeypatch, tmp_path):
    from app.main import load_settings

    monkeypatch.setenv("SGLORA_STORE_PATH", str(tiny_build.out))
    monkeypatch.setenv("SGLORA_K", "0")
    monkeypatch.setenv("SGLORA_DEFAULT_STRATEGY", "magic")
    with pytest.raises(SystemExit) as exc:
        load_settings()
    assert "SGLORA_K" in str(exc.value) and "SGLORA_DEFAULT_STRATEGY" in str(exc.value)

    monkeypatch.delenv("SGLORA_K")
    monkeypatch.delenv("SGLORA_DEFAULT_STRATEGY")
    monkeypatch.setenv("SGLORA_STORE_PATH", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="SGLORA_STORE_PATH.*no model store"):
        load_settings()

    monkeypatch.delenv("SGLORA_STORE_PATH")
    with pytest.raises(SystemExit, match="SGLORA_STORE_PATH"):
        load_settings()

    monkeypatch.setenv("SGLORA_STORE_PATH", str(tiny_build.out))
    monkeypatch.setenv("SGLORA_CORS_ORIGINS", '["https://a.example"]')
    assert load_settings().cors_origins == ["https://a.example"]


def test_importing_the_app_module_reads_no_environment(monkeypatch):
    import importlib

    monkeypatch.delenv("SGLORA_STORE_PATH", raising=False)
    module = importlib.import_module("app.main")
    assert callable(module.create_app)
    with pytest.raises(SystemExit, match="SGLORA_STORE_PATH"):
        module.app  # noqa: B018  (resolving app.main:app is what builds it, as uvicorn does)


def test_a_store_that_does_not_match_the_model_stops_start_up(tiny_build, tmp_path):
    import json
    import shutil

    from app.main import create_app
    from app.ml.store import StoreError

    bad = tmp_path / "store"
    shutil.copytree(tiny_build.out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["base_model"]["weights_id"] = "sha256:" + "0" * 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="base weights"):
        with TestClient(create_app(settings_for(bad, redis_url=None))):
            pass
