"""Cross-request micro-batching gives the results of unbatched serving: concurrent /retrieve requests with
different adapters, and concurrent /generate-lora routing embeddings, really share forwards, and their answers
match the same requests served one by one without batching (same rankings; scores and adapter weights within
float rounding)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load as load_bytes

from tests.test_service_support import metric, png_b64, serving, settings_for

JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def pair(tiny_build):
    """(unbatched client, batched client) sharing one Redis prefix, so adapter ids made by one serve the other."""
    prefix = f"sglora-test:{uuid.uuid4().hex[:12]}:"
    with serving(settings_for(tiny_build.out, redis_prefix=prefix)) as plain, \
            serving(settings_for(tiny_build.out, redis_prefix=prefix, batch_window_ms=150,
                                 max_concurrent_work=8)) as batched:
        yield plain, batched, tiny_build


def concurrently_batched(client, calls, encodings: int) -> list:
    """Results of `calls` (functions run together in threads), made while the batcher's forwards are held until all
    `encodings` have been queued: so they share forwards by construction, not because they happened to arrive
    within the batch window (a busy machine can spread their arrivals wider than any window)."""
    batcher = client.app.state.adapters.batcher
    queued, release = [], threading.Event()
    real_encode, real_forward = batcher.encode, batcher._forward

    async def counted_encode(*args):
        queued.append(args[0])  # on the event loop, in the same step as the real call queues the job
        return await real_encode(*args)

    def held_forward(*args):
        release.wait(120)
        return real_forward(*args)

    batcher.encode, batcher._forward = counted_encode, held_forward
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            deadline = time.monotonic() + 60
            while len(queued) < encodings and time.monotonic() < deadline:
                time.sleep(0.01)
            release.set()
            results = [f.result() for f in futures]
    finally:
        release.set()
        batcher.encode, batcher._forward = real_encode, real_forward
    assert len(queued) == encodings, queued
    return results


def test_concurrent_retrievals_are_batched_and_rank_like_unbatched(pair):
    plain, batched, ctx = pair
    tasks = ctx.split.unseen[:2]
    ids = [plain.post("/generate-lora", json={"description": t.description}, headers=JSON).json()["adapter_id"]
           for t in tasks]
    pairs = ctx.split.test_pairs[tasks[0].name][:6]
    body = {"images": [png_b64(p.image) for p in pairs], "texts": [p.caption for p in pairs]}
    variants = [{}, {"adapter_id": ids[0]}, {"adapter_id": ids[1]}] * 2

    alone = [plain.post("/retrieve", json=body | v).json() for v in variants]
    batches0, samples0 = (metric(batched, "sglora_batch_size_count"), metric(batched, "sglora_batch_size_sum"))
    calls = [lambda v=v: batched.post("/retrieve", json=body | v) for v in variants]
    together = concurrently_batched(batched, calls, encodings=2 * len(variants))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    batches = metric(batched, "sglora_batch_size_count") - batches0
    samples = metric(batched, "sglora_batch_size_sum") - samples0
    assert samples == 2 * len(variants) * len(pairs)  # every image and text went through the batcher ...
    # ... in at most two forwards per tower (what the first window caught, then all the rest), not 12
    assert batches <= 2 * 2, batches

    for want, got in zip(alone, (r.json() for r in together), strict=True):
        assert got["adapter"] == want["adapter"]
        for key, inner in (("images", "texts"), ("texts", "images")):
            for row_w, row_g in zip(want[key], got[key], strict=True):
                scores_w = [x["score"] for x in row_w[inner]]
                scores_g = [x["score"] for x in row_g[inner]]
                assert max(abs(a - b) for a, b in zip(scores_w, scores_g, strict=True)) < 1e-5
                # the same order wherever the scores are not tied within rounding
                order_w = [x["index"] for x in row_w[inner]]
                order_g = [x["index"] for x in row_g[inner]]
                if all(b - a > 1e-5 for a, b in zip(sorted(scores_w), sorted(scores_w)[1:], strict=False)):
                    assert order_g == order_w


def test_concurrent_generations_share_the_routing_forward_and_match_unbatched(pair):
    plain, batched, _ = pair
    descriptions = [f"a photo of a batched shape number {i}" for i in range(4)]
    batches0 = metric(batched, "sglora_batch_size_count")
    calls = [lambda d=d: batched.post("/generate-lora", json={"description": d, "strategy": "topk_weighted",
                                                              "seed": 1}) for d in descriptions]
    together = concurrently_batched(batched, calls, encodings=len(descriptions))
    assert metric(batched, "sglora_batch_size_count") - batches0 <= 2  # text tower only: at most two forwards
    for description, got in zip(descriptions, together, strict=True):
        # seed 0 here: another cache key (topk_weighted ignores the seed), so this one is generated unbatched
        want = plain.post("/generate-lora", json={"description": description, "strategy": "topk_weighted"})
        assert got.status_code == want.status_code == 200
        assert got.headers["x-cache"] == want.headers["x-cache"] == "miss"
        tensors_w, tensors_g = load_bytes(want.content), load_bytes(got.content)
        assert tensors_w.keys() == tensors_g.keys()
        for name in tensors_w:
            torch.testing.assert_close(tensors_g[name], tensors_w[name], rtol=1e-4, atol=1e-6)


def test_a_retrieval_that_generates_never_waits_for_a_batch_while_holding_the_only_slot(tiny_build):
    """A batch takes a model-work slot of its own; a /retrieve with a description generates inside its slot, so
    its routing embedding must not wait for a batch there (with one slot, the batch could never run: the request
    would hang until its deadline, a 503)."""
    settings = settings_for(tiny_build.out, batch_window_ms=5, max_concurrent_work=1, request_deadline_s=20)
    pairs = tiny_build.split.test_pairs[tiny_build.split.unseen[0].name][:2]
    body = {"images": [png_b64(p.image) for p in pairs], "texts": [p.caption for p in pairs],
            "description": f"a photo of a batched retrieval {uuid.uuid4().hex[:6]}"}
    with serving(settings) as client:
        r = client.post("/retrieve", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["adapter"]["cache"] == "miss"  # it generated, in its slot, and ranked in a batch
        assert metric(client, "sglora_batch_size_count") >= 2  # both towers went through the batcher
