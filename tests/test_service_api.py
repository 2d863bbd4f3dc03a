"""The service end to end on the tiny store, against the real Redis on 127.0.0.1:6379 (own key prefix)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load as load_bytes

from offline import pipeline
from tests.test_service_support import encode, metric, png_b64, serving, settings_for

N_PAIRS = 8


@pytest.fixture(scope="module")
def served(tiny_build):
    with serving(settings_for(tiny_build.out)) as client:
        yield client, tiny_build


@pytest.fixture(scope="module")
def task_pairs(tiny_build):
    """Held-out generated pairs of two unseen tasks (images the experts never saw)."""
    tasks = tiny_build.split.unseen[:2]
    return [(t.description, tiny_build.split.test_pairs[t.name][:N_PAIRS]) for t in tasks]


def manifest(ctx) -> dict:
    return json.loads((ctx.out / "manifest.json").read_text())


def generate(client, **body):
    r = client.post("/generate-lora", json=body)
    assert r.status_code == 200, r.text
    return r


def metadata_of(data: bytes, tmp_path) -> dict:
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


# ------------------------------------------------------------------------------------------ /generate-lora


def test_generate_returns_a_safetensors_file_with_the_store_layout_and_metadata(served, tmp_path):
    client, ctx = served
    r = generate(client, description="a photo of a green triangle", seed=3)
    assert r.headers["content-type"] == "application/octet-stream"
    adapter_id = r.headers["x-adapter-id"]
    assert adapter_id == hashlib.sha256(r.content).hexdigest()  # content-addressed
    assert r.headers["content-disposition"] == f'attachment; filename="{adapter_id}.safetensors"'
    assert 0 < float(r.headers["x-coverage"]) <= 1.0001

    m = manifest(ctx)
    tensors = load_bytes(r.content)
    entries = {e["name"]: e["shape"] for e in m["layout"]["entries"]}
    assert {k: list(v.shape) for k, v in tensors.items()} == entries
    assert "visual.transformer.resblocks.0.attn.q_proj.lora_A.weight" in tensors  # documented PEFT-style naming
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)  # not the empty init

    meta = metadata_of(r.content, tmp_path)
    assert meta["base_model"] == m["base_model"]["name"] and meta["weights_id"] == m["base_model"]["weights_id"]
    assert meta["layout_hash"] == m["layout"]["hash"] and meta["store_version"] == m["version"]
    # Unset strategy, K and τ: what the store's leave-one-task-out validation chose.
    default = m["artifacts"]["routing"]["record"]["default_strategy"]
    params = m["artifacts"]["routing"]["record"]["strategy_params"][default]
    assert (meta["strategy"], meta["seed"], meta["k"], meta["tau"]) == (default, "3", str(params["k"]),
                                                                        repr(float(params["tau"])))
    assert float(meta["scale"]) == m["lora"]["alpha"] / m["lora"]["rank"]
    trace = json.loads(meta["trace"])
    assert len(trace["expert_ids"]) == params["k"] and abs(sum(trace["weights"]) - 1) < 1e-6
    # Best first: by predicted gain when the transfer router chose the experts, else by cosine.
    order_key = "predicted_gains" if "predicted_gains" in trace else "similarities"
    assert trace[order_key] == sorted(trace[order_key], reverse=True)
    assert set(trace["expert_ids"]) <= {e["id"] for e in m["experts"]}


def test_identical_call_is_a_cache_hit_with_identical_bytes_and_other_params_miss(served):
    client, _ = served
    body = {"description": "a photo of a blue square", "strategy": "sglora", "seed": 11}
    hits0, gens0 = metric(client, "sglora_cache_hits_total"), metric(client, "sglora_generations_total")
    first = generate(client, **body)
    assert first.headers["x-cache"] == "miss"
    second = generate(client, **body)
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    # Case and spacing do not make another task.
    third = generate(client, **(body | {"description": "  A photo of a   BLUE square "}))
    assert third.headers["x-cache"] == "hit" and third.content == first.content
    assert metric(client, "sglora_cache_hits_total") == hits0 + 2
    assert metric(client, "sglora_generations_total") == gens0 + 1

    other_seed = generate(client, **(body | {"seed": 12}))
    other_strategy = generate(client, **(body | {"strategy": "topk_weighted"}))
    other_k = generate(client, **(body | {"k": 2}))
    for r in (other_seed, other_strategy, other_k):
        assert r.headers["x-cache"] == "miss" and r.content != first.content
    assert metric(client, "sglora_generations_total") == gens0 + 4


def test_json_variant_and_download_by_id(served):
    client, _ = served
    r = client.post("/generate-lora", json={"description": "a photo of a red circle", "strategy": "topk_weighted"},
                    headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["adapter_ids"] == [body["adapter_id"]] and body["strategy"] == "topk_weighted"
    assert body["trace"]["expert_ids"][0] == "red-circle"  # a seen task routes to its own expert first
    assert body["coverage"]["max_similarity"] > 0.99 and body["coverage"]["warning"] is None
    assert body["metadata"]["strategy"] == "topk_weighted"

    file = client.get(f"/adapters/{body['adapter_id']}")
    assert file.status_code == 200 and hashlib.sha256(file.content).hexdigest() == body["adapter_id"]
    assert client.get(f"/adapters/{'0' * 64}").status_code == 404


@pytest.fixture(scope="module")
def sampling_build(tiny_build, tmp_path_factory):
    """The tiny store with its CVAE trained to the last step. The shipped CVAE is early-stopped on held-out experts
    and may be its step 0, where z is unused and every sample is µ*; this one's samples differ by seed."""
    out = tmp_path_factory.mktemp("sampling") / "tiny"
    shutil.copytree(tiny_build.work, out.with_name(out.name + ".work"))
    config = replace(tiny_build.config, cvae=replace(tiny_build.config.cvae, steps=60, val_fraction=0.0))
    ctx = pipeline.make_context(config, out)
    pipeline.step_build_library(ctx)
    pipeline.step_train_cvae(ctx, progress=False)
    return ctx


def test_multiple_samples_are_distinct_downloadable_adapters(sampling_build):
    with serving(settings_for(sampling_build.out, redis_url=None)) as client:
        r = client.post("/generate-lora", json={"description": "a photo of a pink star", "num_samples": 3},
                        headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        ids = r.json()["adapter_ids"]
        assert len(set(ids)) == 3 and ids[0] == r.json()["adapter_id"]
        files = [client.get(f"/adapters/{i}") for i in ids]
        assert all(f.status_code == 200 for f in files)
        vectors = [torch.cat([t.flatten() for _, t in sorted(load_bytes(f.content).items())]) for f in files]
        assert not torch.equal(vectors[0], vectors[1]) and not torch.equal(vectors[1], vectors[2])


def test_low_coverage_is_flagged(tiny_build):
    # A threshold above any cosine makes every generation "uncovered": the warning path, end to end.
    with serving(settings_for(tiny_build.out, redis_url=None, coverage_warning_below=1.0)) as client:
        r = client.post("/generate-lora", json={"description": "an x-ray of a knee"},
                        headers={"Accept": "application/json"})
        warning = r.json()["coverage"]["warning"]  # the gate's reason when it fired, else the coverage warning
        assert r.status_code == 200 and ("no expert" in warning or "far from every expert" in warning)
        assert "x-coverage-warning" in r.headers


def test_readme_snippet_loads_the_file_into_open_clip_and_changes_its_outputs(served, tmp_path, task_pairs):
    """The README's "use the adapter in open_clip" snippet; keep the two in sync:

        from app.ml.adapter_loader import load_adapted_model

        # pretrained: the store's base weights (the tiny demo: <store>/base_weights.safetensors; ViT-B-16: "openai")
        backbone = load_adapted_model("adapter.safetensors", pretrained="model_store/tiny/base_weights.safetensors")
        # backbone.encode_images([...]) / backbone.encode_text([...]) now run with the adapter
    """
    from app.ml.adapter_loader import load_adapted_model
    from app.ml.backbone import load_backbone

    client, ctx = served
    description, pairs = task_pairs[0]
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(generate(client, description=description).content)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    pretrained = str(ctx.out / meta["base_pretrained"])

    backbone = load_adapted_model(str(path), pretrained=pretrained)
    base = load_backbone(meta["base_model"], pretrained=pretrained, device="cpu")
    images, texts = [p.image for p in pairs[:4]], [p.caption for p in pairs[:4]]
    before = base.encode_images(images), base.encode_text(texts)
    after = backbone.encode_images(images), backbone.encode_text(texts)
    assert (before[0] - after[0]).abs().max() > 1e-3 and (before[1] - after[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- /retrieve


def retrieve(client, pairs, **extra):
    body = {"images": [png_b64(p.image) for p in pairs], "texts": [p.caption for p in pairs]} | extra
    r = client.post("/retrieve", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def scores(result) -> list[list[float]]:
    return [[x["score"] for x in row["texts"]] for row in result["images"]]


def assert_well_formed(result, n: int, top_k: int) -> None:
    assert [row["index"] for row in result["images"]] == list(range(n))
    for rows, key in ((result["images"], "texts"), (result["texts"], "images")):
        for row in rows:
            ranked = row[key]
            assert len(ranked) == top_k
            values = [x["score"] for x in ranked]
            assert values == sorted(values, reverse=True)
            assert len({x["index"] for x in ranked}) == top_k and all(0 <= x["index"] < n for x in ranked)


def test_retrieve_zero_shot_description_and_adapter_id(served, task_pairs):
    client, ctx = served
    description, pairs = task_pairs[0]
    n = len(pairs)

    zero = retrieve(client, pairs)
    assert zero["adapter"]["source"] == "zero_shot" and zero["adapter"]["adapter_id"] is None
    assert_well_formed(zero, n, n)
    assert retrieve(client, pairs) == zero  # deterministic

    by_desc = retrieve(client, pairs, description=description, top_k=3)
    default = manifest(ctx)["artifacts"]["routing"]["record"]["default_strategy"]
    assert by_desc["adapter"]["source"] == "description" and by_desc["adapter"]["strategy"] == default
    assert_well_formed(by_desc, n, 3)
    assert retrieve(client, pairs, description=description, top_k=3) == by_desc | {
        "adapter": by_desc["adapter"] | {"cache": "hit"}}

    adapter_id = by_desc["adapter"]["adapter_id"]
    by_id = retrieve(client, pairs, adapter_id=adapter_id, top_k=3)
    assert by_id["adapter"]["source"] == "adapter_id" and by_id["adapter"]["adapter_id"] == adapter_id
    assert by_id["images"] == by_desc["images"] and by_id["texts"] == by_desc["texts"]  # the same adapter

    full = retrieve(client, pairs, adapter_id=adapter_id)
    assert scores(full) != scores(zero)  # the adapter changes the similarities
    assert max(abs(a - b) for ra, rb in zip(scores(full), scores(zero), strict=True)
               for a, b in zip(sorted(ra), sorted(rb), strict=True)) > 1e-4


def test_multipart_upload_ranks_like_json(served, task_pairs):
    client, _ = served
    _, pairs = task_pairs[1]
    as_json = retrieve(client, pairs, top_k=2)
    files = [("images", (f"{i}.png", encode(p.image), "image/png")) for i, p in enumerate(pairs)]
    data = {"texts": [p.caption for p in pairs], "top_k": "2"}
    r = client.post("/retrieve", files=files, data=data)
    assert r.status_code == 200, r.text
    assert r.json() == as_json


def test_concurrent_requests_with_different_adapters_are_isolated(served, task_pairs):
    client, _ = served
    ids = [client.post("/generate-lora", json={"description": d, "strategy": s},
                       headers={"Accept": "application/json"}).json()["adapter_id"]
           for (d, _), s in zip(task_pairs, ("sglora", "topk_weighted"), strict=True)]
    pairs = task_pairs[0][1] + task_pairs[1][1]  # a larger batch: longer forward passes overlap more
    alone = {i: retrieve(client, pairs, adapter_id=i) for i in ids}
    alone[None] = retrieve(client, pairs)
    assert alone[ids[0]] != alone[ids[1]]

    order = [ids[0], ids[1], None, ids[1], ids[0], None] * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda i: retrieve(client, pairs, **({"adapter_id": i} if i else {})), order))
    for adapter_id, result in zip(order, together, strict=True):
        assert result == alone[adapter_id]


# ------------------------------------------------------------------------------------- library and health


def test_experts_lists_the_library(served):
    client, ctx = served
    body = client.get("/experts").json()
    m = manifest(ctx)
    assert body["count"] == len(m["experts"]) == len(ctx.split.seen)
    assert [e["id"] for e in body["experts"]] == [e["id"] for e in m["experts"]]
    assert body["experts"][0]["description"] and "layout_hash" in body["experts"][0]["provenance"]
    assert body["cvae"]["best_step"] == m["cvae"]["info"]["best_step"]  # users can see whether sglora is µ*
    assert body["index"] == {"factory": "Flat", "search": None, "recall_at_4": 1.0}  # 40 experts: exact routing
    # ... and what validation chose, with the leave-one-task-out figures behind it
    recorded = m["artifacts"]["routing"]["record"]
    assert body["routing"]["default_strategy"] == recorded["default_strategy"] and not body["routing"]["stale"]
    assert body["routing"]["validation"]["table"] == recorded["validation"]["table"]


def test_experts_are_paginated_and_searchable(served):
    client, ctx = served
    ids = [e["id"] for e in manifest(ctx)["experts"]]
    pages = [client.get("/experts", params={"offset": o, "limit": 15}).json() for o in (0, 15, 30)]
    assert [e["id"] for p in pages for e in p["experts"]] == ids and all(p["count"] == len(ids) for p in pages)
    assert [len(p["experts"]) for p in pages] == [15, 15, len(ids) - 30]
    # ?q= returns the nearest experts with cosine similarities, best first: an expert's own description is its
    # nearest (similarity 1), and the order is what routing of that description would pick.
    target = manifest(ctx)["experts"][7]
    found = client.get("/experts", params={"q": target["description"], "limit": 5}).json()
    sims = [e["similarity"] for e in found["experts"]]
    assert found["experts"][0]["id"] == target["id"] and sims[0] == pytest.approx(1.0, abs=1e-4)
    assert sims == sorted(sims, reverse=True) and len(sims) == 5 and found["q"] == target["description"]
    trace = generate(client, description=target["description"], strategy="topk_weighted", k=4).headers
    assert trace["x-store-version"] == found["store_version"]
    for params, field in (({"limit": 0}, "limit"), ({"offset": -1}, "offset"), ({"q": "  "}, "q")):
        r = client.get("/experts", params=params)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_gate_serves_zero_shot_and_says_why_for_a_description_far_from_the_library(served, task_pairs):
    client, ctx = served
    far = "!!!!!!"  # best cosine to any expert ≈ 0.5; every seen task's is ≥ ≈ 0.87
    body = client.post("/generate-lora", json={"description": far}, headers={"accept": "application/json"}).json()
    assert body["gated"] and "far from every expert" in body["gated"]
    assert body["coverage"]["warning"].startswith("served zero-shot")
    data = client.get(f"/adapters/{body['adapter_id']}").content  # the promise holds: the id downloads
    assert all(t.abs().sum() == 0 for t in load_bytes(data).values())  # B = 0 and A = 0: exactly zero-shot
    ungated = client.post("/generate-lora", json={"description": far, "gate": False},
                          headers={"accept": "application/json"}).json()
    assert ungated["gated"] is None and ungated["adapter_id"] != body["adapter_id"]
    _, pairs = task_pairs[0]
    images = [png_b64(p.image) for p in pairs]
    texts = [p.caption for p in pairs]
    gated = client.post("/retrieve", json={"images": images, "texts": texts, "description": far}).json()
    zero = client.post("/retrieve", json={"images": images, "texts": texts}).json()
    assert gated["adapter"]["gated"] and gated["images"] == zero["images"]  # /retrieve fell back to zero-shot


def test_metrics_move_after_requests(served):
    client, _ = served
    route = {"method": "GET", "route": "/experts", "status": "200"}
    before = metric(client, "sglora_http_requests_total", **route)
    retrievals = metric(client, "sglora_retrieval_duration_seconds_count")
    client.get("/experts")
    client.get("/experts")
    assert metric(client, "sglora_http_requests_total", **route) == before + 2
    assert metric(client, "sglora_http_request_duration_seconds_count", method="GET", route="/experts") >= 2
    assert client.post("/retrieve", json={"images": [png_b64(_grey())], "texts": ["x"]}).status_code == 200
    assert metric(client, "sglora_retrieval_duration_seconds_count") == retrievals + 1
    assert metric(client, "sglora_ready") == 1


def _grey():
    from PIL import Image

    return Image.new("RGB", (32, 32), (100, 100, 100))


def test_ready_is_503_until_warm_then_200(tiny_build):
    from app.main import create_app

    app = create_app(settings_for(tiny_build.out, redis_url=None, load_in_background=True))
    assert TestClient(app).get("/health/ready").status_code == 503  # no lifespan yet: nothing loaded

    engine, gate = app.state.engine, threading.Event()
    real_load = engine.load
    engine.load = lambda: (gate.wait(60), real_load())
    with TestClient(app) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        assert client.get("/health/live").status_code == 200
        r = client.post("/generate-lora", json={"description": "a photo of a red circle"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert metric(client, "sglora_ready") == 0
        gate.set()
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "engine never became ready"
            time.sleep(0.05)
        assert client.get("/health/ready").json()["store_version"] == manifest(tiny_build)["version"]
        assert client.post("/generate-lora", json={"description": "a photo of a red circle"}).status_code == 200
        assert metric(client, "sglora_ready") == 1
