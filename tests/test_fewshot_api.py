"""Few-shot examples through the API: /generate-lora and /retrieve's description path, on the tiny store, with the
real Redis (own key prefix). The refinement's numbers are not asserted, only what it must report and key."""

from __future__ import annotations

import base64
import json

import pytest

from app.ml.fewshot import METHODS
from app.services.fewshot import RawExample, examples_sha256
from tests.test_service_support import encode, png_b64, redis_client, serving, settings_for

N_EXAMPLES = 8


@pytest.fixture(scope="module")
def served(tiny_build):
    settings = settings_for(tiny_build.out, redis_backoff_s=0.0)
    with serving(settings) as client:
        yield client, settings, tiny_build


@pytest.fixture(scope="module")
def task(tiny_build):
    """An unseen task: its description and examples from its TRAINING pairs."""
    t = tiny_build.split.unseen[0]
    return t.description, t.pairs[:N_EXAMPLES]


def as_json(pairs) -> list[dict]:
    return [{"image": png_b64(p.image), "caption": p.caption} for p in pairs]


def gen_keys(settings) -> set[bytes]:
    return set(redis_client().scan_iter(match=settings.redis_prefix + "gen:*"))


def generate(client, **body):
    return client.post("/generate-lora", json=body, headers={"Accept": "application/json"})


def test_examples_refine_the_adapter_and_the_response_says_what_they_did(served, task):
    client, settings, _ = served
    description, pairs = task
    r = generate(client, description=description, examples=as_json(pairs))
    assert r.status_code == 200, r.text
    body = r.json()
    refinement = body["refinement"]
    assert refinement["examples"] == N_EXAMPLES and refinement["method"] in METHODS
    assert refinement["steps"] >= 1 and refinement["seconds"] >= 0 and isinstance(refinement["stopped_early"], bool)
    assert refinement["stop_reason"]
    for name in ("loss_before", "loss_after", "check_loss_before", "check_loss_after"):
        assert refinement[name] > 0
    assert refinement["check_loss_after"] <= refinement["check_loss_before"]  # the best checked adapter is served
    assert len(refinement["candidate_ids"]) > 0

    # The metadata records the examples' count and hash, never their captions or pixels.
    meta = body["metadata"]
    raw = [RawExample(f"examples[{i}]", base64.b64decode(e["image"]), e["caption"]) for i, e in
           enumerate(as_json(pairs))]
    assert meta["examples"] == str(N_EXAMPLES) and meta["examples_sha256"] == examples_sha256(raw)
    assert not any(p.caption in value for p in pairs for value in meta.values())

    # The examples are part of the key: the same request is a hit on the same id; other examples, another one.
    again = generate(client, description=description, examples=as_json(pairs)).json()
    assert (again["cache"], again["adapter_id"]) == ("hit", body["adapter_id"])
    without = generate(client, description=description).json()
    assert without["adapter_id"] != body["adapter_id"] and without["refinement"] is None
    changed = as_json(pairs)
    changed[0]["caption"] += " again"
    other = generate(client, description=description, examples=changed).json()
    assert other["cache"] == "miss" and other["adapter_id"] != body["adapter_id"]
    # The id handed out is fetchable, refinement and all.
    fetched = client.get(f"/adapters/{body['adapter_id']}", headers={"Accept": "application/json"}).json()
    assert fetched["refinement"] == refinement


def test_fewer_examples_than_a_check_half_needs_change_nothing_and_say_so(served, task):
    client, _, _ = served
    description, pairs = task
    body = generate(client, description=description, examples=as_json(pairs[:2])).json()
    assert body["refinement"]["steps"] == 0 and "too few examples" in body["refinement"]["stop_reason"]


def _bad(pairs, what: str):
    examples = as_json(pairs)
    if what == "undecodable image":
        examples[1]["image"] = base64.b64encode(b"this is not an image").decode()
        return examples, "examples[1].image"
    if what == "not base64":
        examples[2]["image"] = "%%%"
        return examples, "examples[2].image"
    if what == "empty caption":
        examples[0]["caption"] = "   "
        return examples, "examples[0].caption"
    if what == "too many":
        return examples * 3, "examples"
    if what == "too large":
        from PIL import Image

        examples[3]["image"] = base64.b64encode(encode(Image.new("RGB", (4200, 4200)))).decode()
        return examples, "examples[3].image"
    if what == "corrupt after the header":
        examples[4]["image"] = base64.b64encode(encode(pairs[4].image)[:60]).decode()  # header intact, data cut
        return examples, "examples[4].image"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["undecodable image", "not base64", "empty caption", "too many", "too large",
                                  "corrupt after the header"])
def test_bad_examples_get_a_4xx_naming_the_field_and_nothing_is_cached(served, task, what):
    client, settings, _ = served
    description, pairs = task
    examples, field = _bad(pairs, what)
    before = gen_keys(settings)
    r = generate(client, description=f"{description} ({what})", examples=examples)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["field"] == field
    assert gen_keys(settings) == before


def test_retrieve_refines_the_description_adapter_on_examples_json_and_multipart(served, task, tiny_build):
    client, _, _ = served
    description, pairs = task
    held_out = tiny_build.split.test_pairs[tiny_build.split.unseen[0].name][:4]
    body = {"images": [png_b64(p.image) for p in held_out], "texts": [p.caption for p in held_out],
            "description": description, "examples": as_json(pairs)}
    r = client.post("/retrieve", json=body)
    assert r.status_code == 200, r.text
    used = r.json()["adapter"]
    assert used["source"] == "description" and used["refinement"]["examples"] == N_EXAMPLES

    files = [("images", (f"{i}.png", encode(p.image), "image/png")) for i, p in enumerate(held_out)]
    files += [("example_images", (f"e{i}.png", encode(p.image), "image/png")) for i, p in enumerate(pairs)]
    data = {"texts": [p.caption for p in held_out], "description": description,
            "example_captions": [p.caption for p in pairs]}
    r = client.post("/retrieve", files=files, data=data)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["refinement"]["examples"] == N_EXAMPLES

    r = client.post("/retrieve", files=files, data=data | {"example_captions": [p.caption for p in pairs[:-1]]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "example_captions"
    r = client.post("/retrieve", json={k: v for k, v in body.items() if k != "description"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "examples"


def test_examples_ask_for_one_adapter(served, task):
    client, _, _ = served
    description, pairs = task
    r = generate(client, description=description, examples=as_json(pairs), num_samples=2)
    assert r.status_code == 422 and r.json()["error"]["field"] == "num_samples"
    assert json.loads(r.text)["error"]["message"].startswith("num_samples=2 with examples")


def test_the_client_sends_examples_to_both_routes(served, task, tmp_path):
    import sys

    from tests.live_server import ROOT

    sys.path.insert(0, str(ROOT / "client"))
    from sglora_client import SGLoRAClient

    client, _, _ = served
    description, pairs = task
    sdk = SGLoRAClient()
    sdk._http = client  # the in-process app (a TestClient is an httpx.Client)
    paths = []
    for i, p in enumerate(pairs):
        paths.append(tmp_path / f"e{i}.png")
        p.image.save(paths[-1])
    examples = [(path, p.caption) for path, p in zip(paths, pairs, strict=True)]
    info = sdk.generate(description, examples=examples)
    assert info["refinement"]["examples"] == N_EXAMPLES
    result = sdk.retrieve(paths[:2], [p.caption for p in pairs[:2]], description=description, examples=examples)
    assert result["adapter"]["refinement"]["examples"] == N_EXAMPLES
    assert result["adapter"]["adapter_id"] == info["adapter_id"]  # same description and examples: one cache key
