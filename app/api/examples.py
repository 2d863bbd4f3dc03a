"""OpenAPI examples for every route, in one place: the shapes the README's curl and the playground send.

`add_openapi_examples(schema)` fills them into FastAPI's generated schema (request bodies, path parameters and
responses), so the route modules stay thin; tests/test_openapi_examples.py posts every request example to the app
and validates every response example against its response model, so an example cannot drift from the API.
"""

from __future__ import annotations

from app.ml.aggregator import AggregationTrace

# 8x8 PNGs (green, red), base64: small enough to read, real enough to decode.
GREEN_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGOUW2DDgA0wYRUdtBIAyEYBCqhSTKsAAAAASUVORK5CYII="
RED_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8oaHBgA0wYRUdtBIA4DgBKJ8lCQoAAAAASUVORK5CYII="
ADAPTER_ID = "5f1c0e7b9a3d4c2e8f6a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"

# Made by the class the service uses, so the example's per-expert reasons read exactly as served ones.
TRACE = AggregationTrace(
    expert_ids=["green-ring", "green-triangle", "green-cross", "yellow-star"],
    descriptions=["a photo of a green ring", "a photo of a green triangle", "a photo of a green cross",
                  "a photo of a yellow star"],
    similarities=[0.9712, 0.9687, 0.9194, 0.8974],
    weights=[0.3948, 0.3750, 0.1399, 0.0902],
    predicted_gains=[9.81, 9.57, 8.52, 7.96],
    routed_by="predicted_gain",
).to_dict()

GENERATE_REQUEST = {
    "minimal": {"summary": "just a description (server defaults)", "value": {"description": "a photo of a green star"}},
    "explicit": {"summary": "strategy, K, temperature, seed", "value": {
        "description": "a photo of a green star", "strategy": "sglora", "k": 4, "tau": 0.05, "seed": 0}},
}

GENERATE_RESPONSE = {
    "adapter_id": ADAPTER_ID,
    "adapter_ids": [ADAPTER_ID],
    "downloadable": True,
    "download_url": f"http://127.0.0.1:8000/adapters/{ADAPTER_ID}",
    "downloads": {"safetensors": f"http://127.0.0.1:8000/adapters/{ADAPTER_ID}",
                  "peft": f"http://127.0.0.1:8000/adapters/{ADAPTER_ID}?format=peft",
                  "open_clip-merged": f"http://127.0.0.1:8000/adapters/{ADAPTER_ID}?format=open_clip-merged"},
    "cache": "miss",
    "strategy": "transfer_routed",
    "served": "transfer_routed",
    "trace": TRACE,
    "coverage": {"max_similarity": 0.9712, "threshold": 0.5, "warning": None},
    "metadata": {"format": "sglora-adapter/1", "base_model": "tiny_clip", "strategy": "transfer_routed",
                 "coverage": "0.9712", "gated": "",
                 "description": "a photo of a green star", "seed": "0", "k": "4", "tau": "0.05", "rank": "2",
                 "alpha": "4.0", "scaling": "standard", "scale": "2.0", "towers": '["vision", "text"]'},
}

RETRIEVE_JSON = {
    "with a description": {"summary": "adapter generated from a description (through the cache)", "value": {
        "images": [GREEN_PNG, RED_PNG], "texts": ["a small green star at the top left", "a large red circle"],
        "description": "a photo of a green star", "top_k": 2}},
    "zero-shot": {"summary": "no adapter: base CLIP", "value": {
        "images": [GREEN_PNG, RED_PNG], "texts": ["a green square", "a red square"]}},
}
RETRIEVE_MULTIPART = {
    "files": {"summary": "curl -F images=@a.png -F images=@b.png -F texts=... -F description=...", "value": {
        "images": ["<a.png>", "<b.png>"], "texts": ["a small green star at the top left", "a large red circle"],
        "description": "a photo of a green star"}},
}

RETRIEVE_RESPONSE = {
    "store_version": "31b768cb6399",
    "adapter": {"source": "description", "adapter_id": ADAPTER_ID, "cache": "hit", "strategy": "sglora",
                "max_similarity": 0.9712},
    "images": [{"index": 0, "texts": [{"index": 0, "score": 0.8123}, {"index": 1, "score": 0.4021}]},
               {"index": 1, "texts": [{"index": 1, "score": 0.7710}, {"index": 0, "score": 0.3905}]}],
    "texts": [{"index": 0, "images": [{"index": 0, "score": 0.8123}, {"index": 1, "score": 0.3905}]},
              {"index": 1, "images": [{"index": 1, "score": 0.7710}, {"index": 0, "score": 0.4021}]}],
}

_PROVENANCE = {"n_pairs": 80, "final_loss": 1.0618, "layout_hash": "e220c675e7a0268c", "steps": 100, "lr": 0.01,
               "batch_size": 32, "keep_last": 20, "seed": 0}
EXPERTS_RESPONSE = {
    "store_version": "31b768cb6399",
    "count": 40,
    "offset": 0,
    "limit": 2,
    "q": "a photo of a red star",
    "index": {"factory": "Flat", "search": None, "recall_at_4": 1.0},
    "experts": [
        {"id": "red-square", "description": "a photo of a red square", "provenance": _PROVENANCE,
         "similarity": 0.9421},
        {"id": "red-circle", "description": "a photo of a red circle", "provenance": _PROVENANCE,
         "similarity": 0.9307},
    ],
    "cvae": {"parameters": 637504, "steps": 400, "best_step": 0, "val_error": 0.9849, "val_error_of_mu_star": 0.9849,
             "k": 4, "tau": 0.05, "seed": 0},
}

RELOAD_RESPONSE = {"changed": True, "version": "8d0f2b6c41aa", "previous_version": "31b768cb6399", "experts": 41,
                   "seconds": 1.83}

HEALTH_READY = {"status": "ready", "store_version": "31b768cb6399", "cache_backend": "redis",
                "cache_degraded": False, "detail": None}
HEALTH_LOADING = {"status": "loading", "store_version": None, "cache_backend": "redis", "cache_degraded": False,
                  "detail": None}
HEALTH_LIVE = {"status": "alive", "store_version": None, "cache_backend": None, "cache_degraded": None,
               "detail": None}

# (path, method) -> where each example goes. "request": {media type: named examples}; "params": {name: value};
# "responses": {status: {media type: example}}.
EXAMPLES: dict[tuple[str, str], dict] = {
    ("/generate-lora", "post"): {
        "request": {"application/json": GENERATE_REQUEST},
        "params": {"format": "peft"},
        "responses": {"200": {"application/json": GENERATE_RESPONSE}},
    },
    ("/adapters/{adapter_id}", "get"): {
        "params": {"adapter_id": ADAPTER_ID, "format": "peft"},
        "responses": {"200": {"application/json": GENERATE_RESPONSE | {"cache": "hit"}}},
    },
    ("/retrieve", "post"): {
        "request": {"application/json": RETRIEVE_JSON, "multipart/form-data": RETRIEVE_MULTIPART},
        "responses": {"200": {"application/json": RETRIEVE_RESPONSE}},
    },
    ("/experts", "get"): {"params": {"q": "a photo of a red star", "offset": 0, "limit": 2},
                          "responses": {"200": {"application/json": EXPERTS_RESPONSE}}},
    ("/admin/reload", "post"): {"responses": {"200": {"application/json": RELOAD_RESPONSE}}},
    ("/health/live", "get"): {"responses": {"200": {"application/json": HEALTH_LIVE}}},
    ("/health/ready", "get"): {"responses": {"200": {"application/json": HEALTH_READY},
                                             "503": {"application/json": HEALTH_LOADING}}},
}


def add_openapi_examples(schema: dict) -> dict:
    """Fill EXAMPLES into a generated OpenAPI schema (in place; idempotent). Unknown routes are left alone;
    an example for a route, parameter or status the schema lacks raises, so the two cannot silently diverge."""
    paths = schema.get("paths", {})
    for (path, method), spec in EXAMPLES.items():
        operation = paths.get(path, {}).get(method)
        if operation is None:
            raise KeyError(f"OpenAPI example for {method.upper()} {path}, which the app does not serve")
        for media, named in spec.get("request", {}).items():
            operation["requestBody"]["content"][media]["examples"] = named
        params = {p["name"]: p for p in operation.get("parameters", [])}
        for name, value in spec.get("params", {}).items():
            params[name]["example"] = value
        for status, media_examples in spec.get("responses", {}).items():
            content = operation["responses"][status].setdefault("content", {})
            for media, example in media_examples.items():
                content.setdefault(media, {})["example"] = example
    return schema
