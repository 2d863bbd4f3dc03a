"""Routing whose per-request cost does not grow with the library: exclusion inside the FAISS search, and the
transfer router's ranking as an inner-product search that gives the exhaustive ranking back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.ml import index_search
from app.ml.aggregator import ExpertBank, build_index, route, route_by_gain, route_by_gain_index
from app.ml.gain_index import GainIndex
from app.ml.transfer_router import TransferRouter, features, fit_transfer_router


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, width: int = 16) -> np.ndarray:
    centres = rng.normal(size=(max(4, n // 50), width))
    return unit(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, width)))


def bank_of(embeddings: np.ndarray, factory: str = "Flat") -> ExpertBank:
    n = len(embeddings)
    return ExpertBank([f"e{i}" for i in range(n)], ["d"] * n, torch.zeros(n, 2), torch.zeros(n, 2), embeddings,
                      build_index(embeddings, factory))


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat", "IVF8,PQ4x4fs,RFlat"])
def test_exclusion_happens_inside_the_search_and_keeps_the_tuned_breadth(factory: str) -> None:
    rng = np.random.default_rng(0)
    emb = clustered(rng, 600)
    breadth = {"IVF8,Flat": "nprobe=8", "IVF8,PQ4x4fs,RFlat": "nprobe=8,k_factor_rf=16"}.get(factory)
    index = build_index(emb, factory, breadth)
    queries = emb[:20]
    excluded = set(range(0, 600, 3)) | set(range(20))  # every query's own row among them
    _, truth = index_search.search(build_index(emb), queries, 4, excluded)
    scores, rows = index_search.search(index, queries, 4, excluded)
    assert not set(rows.ravel().tolist()) & excluded and (rows >= 0).all()
    # The per-call parameters copy the index's own breadth (all lists probed, a 16x short list re-ranked).
    recall = np.mean([len(set(t) & set(f)) / 4 for t, f in zip(truth.tolist(), rows.tolist(), strict=True)])
    assert recall >= (1.0 if factory in ("Flat", "IVF8,Flat") else 0.9)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_route_excludes_through_the_index(rng=np.random.default_rng(1)) -> None:
    emb = clustered(rng, 300)
    bank = bank_of(emb)
    rows, sims = route(bank, emb[5], k=3, exclude=["e5", "unknown-id"])
    order = np.argsort(-(emb @ emb[5]), kind="stable")
    assert rows == [int(r) for r in order if r != 5][:3]
    np.testing.assert_allclose(sims, emb[rows] @ emb[5], rtol=1e-5)


def random_router(rng: np.random.Generator, experts: np.ndarray, tasks: int, bandwidth: float) -> TransferRouter:
    width = experts.shape[1]
    mean, whiten = experts.mean(axis=0).astype(np.float64), np.eye(width)
    task_f = features(clustered(rng, tasks, width), mean, whiten)
    return TransferRouter(task_f, features(experts, mean, whiten), rng.normal(size=(tasks, len(experts))), mean,
                          whiten, 1.5, bandwidth, 0.1, 1.0)


@pytest.mark.parametrize("bandwidth", [0.0, 0.5])
def test_router_is_an_inner_product_of_low_rank_embeddings(bandwidth: float) -> None:
    rng = np.random.default_rng(2)
    experts = clustered(rng, 120)
    router = random_router(rng, experts, tasks=10, bandwidth=bandwidth)
    z_nr, u_r = router.expert_embeddings(experts), router.query_embedding(experts[3])
    assert z_nr.shape == (120, 10) and u_r.shape == (10,)  # rank ≤ T: 10 numbers per expert, whatever E
    np.testing.assert_allclose(router.bias + z_nr @ u_r, router.predict(experts[3], experts), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bandwidth", [0.0, 1.0])
def test_gain_index_ranking_equals_the_exhaustive_ranking(bandwidth: float) -> None:
    rng = np.random.default_rng(3)
    experts = clustered(rng, 400)
    bank = bank_of(experts)
    router = fit_transfer_router(experts[:30], experts, rng.normal(size=(30, 400)), bandwidth=bandwidth)
    index = GainIndex(router, bank.embeddings)
    for q in range(0, 400, 37):
        exclude = [f"e{q}", f"e{(q + 1) % 400}"]
        expected = route_by_gain(bank, router.predict(experts[q], experts), experts[q], 6, exclude)
        got = route_by_gain_index(bank, index, experts[q], 6, exclude)
        assert got[0] == expected[0]
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[2], expected[2], rtol=1e-9, atol=1e-9)


def test_route_by_gain_index_refuses_k_beyond_the_routable_experts() -> None:
    rng = np.random.default_rng(5)
    experts = clustered(rng, 8)
    bank = bank_of(experts)
    index = GainIndex(random_router(rng, experts, tasks=3, bandwidth=0.0), bank.embeddings)
    with pytest.raises(ValueError, match="k=8 is out of range: 7 experts"):
        route_by_gain_index(bank, index, experts[0], 8, ["e0"])


def test_on_the_tiny_store_the_served_ranking_is_the_exhaustive_one(tiny_build) -> None:
    """The transfer router's quality is unchanged: on the validated tiny store, for every expert's description
    (leave-self-out, as validation routes) and noisy re-phrasings of it, the served top-K is the exhaustive one
    (same experts, same order) with the same gains, and the gate sees the same best cosine and best gain."""
    from app.ml.routing_index import held_out_queries
    from app.ml.store import load_store
    from app.ml.strategies import validated_params

    store = load_store(tiny_build.out, mmap_library=True)
    assert store.routing is not None and store.routing.router is not None, "the tiny store is validated"
    bank, router = store.bank, store.routing.router
    index = store.routing.gain_index(bank.embeddings)
    assert index is store.routing.gain_index(bank.embeddings)  # built once per loaded store
    k = validated_params(store, "transfer_routed")[0]
    queries = np.concatenate([bank.embeddings, held_out_queries(bank.embeddings, 40, seed=3)])
    for i, query in enumerate(queries):
        exclude = [bank.ids[i % len(bank)]]
        gains_e = router.predict(query, bank.embeddings)
        rows, gains_k, sims_k = route_by_gain(bank, gains_e, query, k, exclude)
        got_rows, got_gains, got_sims = route_by_gain_index(bank, index, query, k, exclude)
        assert got_rows == rows
        np.testing.assert_allclose(got_gains, gains_k, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got_sims, sims_k, rtol=1e-9, atol=1e-9)
        keep = np.arange(len(bank)) != i % len(bank)
        _, best_cos = route(bank, query, 1, exclude)
        assert abs(float(best_cos[0]) - float((bank.embeddings[keep] @ query).max())) < 1e-5
        best_gain = route_by_gain_index(bank, index, query, 1, exclude)[1][0]
        assert abs(best_gain - gains_e[keep].max()) < 1e-9


def test_the_gate_reuses_the_transfer_routed_priors_search_and_decides_the_same(tiny_build, monkeypatch) -> None:
    """One gain-index search per transfer-routed generation (the gate takes the prior's top gain), and the gate's
    decision is the one its own search would give, in-domain and out of domain."""
    from app.ml.backbone import load_backbone
    from app.ml.store import load_store
    from app.ml.strategies import GenerationRequest, coverage, default_strategy, gate_reason, generate_adapters
    from offline.train_experts import describe

    store = load_store(tiny_build.out)
    backbone = load_backbone(store.base_model["name"], store.base_pretrained(), "cpu")
    searches = []
    top = GainIndex.top
    monkeypatch.setattr(GainIndex, "top", lambda self, *a, **kw: searches.append(1) or top(self, *a, **kw))
    texts = [task.description for task in tiny_build.split.unseen] + ["a chest x-ray", "a photo of a dog"]
    decisions = []
    for text in texts:
        query = describe(backbone, [text])[0].numpy()
        for strategy in {"transfer_routed", default_strategy(store)}:
            searches.clear()
            generation = generate_adapters(store, strategy, GenerationRequest(query=query, seed=0))
            if strategy == "transfer_routed":
                assert len(searches) == 1
            alone = gate_reason(store, query, (), coverage(store.bank, query))
            assert generation.gated == alone
            decisions.append(alone is None)
    assert any(decisions) and not all(decisions)  # both outcomes were checked
