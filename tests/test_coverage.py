"""Coverage has one definition — the best cosine of the description to any library expert — and every answer
reports it, whatever the strategy routed to; the confidence gate's message quotes that same number; a gated answer
is shown as what it is (zero-shot, no expert weights). Checked against the store's own embeddings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from app.ml.strategies import STRATEGIES
from app.services.cache import normalise_description
from tests.test_service_support import serving, settings_for

JSON = {"accept": "application/json"}
# Reworded, out-of-domain and nonsense descriptions beside the library's own template (seen and unseen tasks).
OTHER_DESCRIPTIONS = ["a picture of a green star", "green star", "a photo of a dog", "a chest x-ray",
                      "a photo of a brown hexagon", "zzz qqq", "a small red shape on a grey background",
                      "an image showing a blue circle"]


def twenty_descriptions(ctx) -> list[str]:
    unseen = [t.description for t in ctx.split.unseen][:8]
    seen = [t.description for t in ctx.split.seen][: 20 - len(unseen) - len(OTHER_DESCRIPTIONS)]
    descriptions = unseen + seen + OTHER_DESCRIPTIONS
    assert len(set(descriptions)) == 20
    return descriptions


def library_coverage(engine, description: str) -> float:
    """The definition, computed here from the store's embeddings (not through the service's code path)."""
    query = engine.describe(normalise_description(description)).astype(np.float64)
    return float((engine.store.bank.embeddings.astype(np.float64) @ query).max())


@pytest.fixture(scope="module")
def client(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None)) as client:
        yield client


def test_x_coverage_is_the_best_cosine_to_any_expert_for_every_strategy(client, tiny_build):
    engine = client.app.state.engine
    descriptions = twenty_descriptions(tiny_build)
    expected = {d: library_coverage(engine, d) for d in descriptions}
    assert max(expected.values()) - min(expected.values()) > 0.05  # the descriptions do differ in coverage
    routed_below, gated, worst = 0, 0, 0.0
    for strategy in sorted(STRATEGIES):
        for description in descriptions:
            r = client.post("/generate-lora", json={"description": description, "strategy": strategy}, headers=JSON)
            assert r.status_code == 200, r.text
            body, coverage = r.json(), float(r.headers["x-coverage"])
            assert coverage == pytest.approx(expected[description], abs=2e-6), (strategy, description)
            worst = max(worst, abs(coverage - expected[description]))
            assert body["coverage"]["max_similarity"] == pytest.approx(coverage, abs=1e-6)
            if body["gated"]:  # the gate's message quotes the very number the header reports
                gated += 1
                assert f"best cosine {coverage:.3f}" in body["gated"] and body["served"] == "zero_shot"
                assert body["trace"] is None and r.headers["x-gated"] == "zero-shot"
            elif body["trace"] is not None:
                trace = body["trace"]
                assert max(trace["similarities"]) <= coverage + 1e-6
                routed_below += max(trace["similarities"]) < coverage - 1e-4
                assert len(trace["reasons"]) == len(trace["expert_ids"]) and body["served"] == strategy
    print(f"{len(descriptions)} descriptions x {len(STRATEGIES)} strategies: max |X-Coverage - max cosine| "
          f"{worst:.1e}; coverage {min(expected.values()):.3f}..{max(expected.values()):.3f}; {gated} gated; "
          f"{routed_below} answers whose routed experts' best cosine is below the coverage")
    # Routing by predicted gain picks experts other than the nearest: the case where the two numbers used to differ.
    assert routed_below > 0


def test_the_gate_quotes_the_coverage_it_reports_and_shows_zero_shot(client, tiny_build):
    engine = client.app.state.engine
    routing = engine.store.routing
    assert routing is not None and routing.gate is not None
    descriptions = twenty_descriptions(tiny_build)
    original = routing.gate
    routing.gate = replace(original, min_coverage=2.0)  # force the condition: no description is covered enough
    try:
        for description in descriptions:
            r = client.post("/generate-lora", json={"description": description, "seed": 7}, headers=JSON)
            body, coverage = r.json(), float(r.headers["x-coverage"])
            assert coverage == pytest.approx(library_coverage(engine, description), abs=2e-6)
            assert f"best cosine {coverage:.3f} < 2.000" in body["gated"], body["gated"]
            assert body["served"] == "zero_shot" and body["trace"] is None and r.headers["x-gated"] == "zero-shot"
            assert "\"gate\": false" in body["coverage"]["warning"]  # the opt-out is named
        opted_out = client.post("/generate-lora", json={"description": descriptions[0], "gate": False, "seed": 7},
                                headers=JSON).json()
        assert opted_out["gated"] is None and opted_out["served"] == opted_out["strategy"]
        assert opted_out["trace"]["reasons"] and opted_out["trace"]["weights"]
    finally:
        routing.gate = original
