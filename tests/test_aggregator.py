"""Tests for app/ml/aggregator.py against a plain numpy reference written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.ml.aggregator import (
    AggregationTrace,
    ExpertBank,
    aggregate_experts,
    build_index,
    coverage,
    route,
    softmax_weights,
    uniform_prior,
)

E, D, EMB = 20, 50, 16  # experts, flat LoRA length, text-embedding width


# ---------------------------------------------------------------------------------------------
# Fixtures and the numpy reference
# ---------------------------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    x = rng.standard_normal((n, width))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_bank(rng: np.random.Generator, n: int = E, factory: str = "Flat") -> ExpertBank:
    embeddings = unit_rows(rng, n, EMB)
    return ExpertBank(
        ids=[f"expert-{i}" for i in range(n)],
        descriptions=[f"a photo of thing {i}" for i in range(n)],
        mu=torch.from_numpy(rng.standard_normal((n, D)).astype(np.float32)),
        var=torch.from_numpy(rng.gamma(2.0, 0.5, size=(n, D)).astype(np.float32)),
        embeddings=embeddings,
        index=build_index(embeddings, factory),
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def bank(rng: np.random.Generator) -> ExpertBank:
    return make_bank(rng)


def ref_topk(embeddings: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    cos = embeddings.astype(np.float64) @ query.astype(np.float64)
    rows = np.argsort(-cos, kind="stable")[:k]
    return rows, cos[rows]


def ref_softmax(sims: np.ndarray, tau: float) -> np.ndarray:
    z = sims / tau
    w = np.exp(z - z.max())
    return w / w.sum()


def ref_mixture(mu: np.ndarray, var: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mixture moments written term by term, as in the paper."""
    mu_star = np.zeros(mu.shape[1])
    for a, m in zip(alpha, mu, strict=True):
        mu_star += a * m
    var_star = np.zeros(mu.shape[1])
    for a, m, v in zip(alpha, mu, var, strict=True):
        var_star += a * v + a * (m - mu_star) ** 2
    return mu_star, var_star


def bank_arrays(bank: ExpertBank) -> tuple[np.ndarray, np.ndarray]:
    return bank.mu.numpy().astype(np.float64), bank.var.numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 7, E])
@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5, 2.0])
def test_aggregate_matches_numpy_reference(rng: np.random.Generator, k: int, tau: float) -> None:
    bank = make_bank(rng)
    mu, var = bank_arrays(bank)
    for query in unit_rows(rng, 3, EMB):
        rows_ref, sims_ref = ref_topk(bank.embeddings, query, k)
        alpha_ref = ref_softmax(sims_ref, tau)
        mu_ref, var_ref = ref_mixture(mu[rows_ref], var[rows_ref], alpha_ref)

        prior = aggregate_experts(bank, query, k=k, tau=tau)

        assert prior.trace.expert_ids == [bank.ids[r] for r in rows_ref]
        assert prior.trace.descriptions == [bank.descriptions[r] for r in rows_ref]
        np.testing.assert_allclose(prior.trace.similarities, sims_ref, atol=1e-5)
        np.testing.assert_allclose(prior.trace.weights, alpha_ref, rtol=1e-4, atol=1e-7)
        assert prior.mu.shape == (D,) and prior.var.shape == (D,)
        assert prior.mu.dtype == torch.float32 and prior.var.dtype == torch.float32
        np.testing.assert_allclose(prior.mu.numpy(), mu_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(prior.var.numpy(), var_ref, rtol=1e-4, atol=1e-5)


def test_route_returns_bruteforce_topk_best_first(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    rows, sims = route(bank, query, k=5)
    rows_ref, sims_ref = ref_topk(bank.embeddings, query, 5)
    assert rows == rows_ref.tolist()
    np.testing.assert_allclose(sims, sims_ref, atol=1e-5)
    assert np.all(np.diff(sims) <= 0)


@pytest.mark.parametrize("tau", [1e-4, 0.05, 1.0, 100.0])
def test_softmax_weights_sum_to_one_and_match_reference(rng: np.random.Generator, tau: float) -> None:
    sims = rng.uniform(-1, 1, size=6)
    alpha = softmax_weights(sims, tau)
    assert alpha.dtype == np.float64
    assert abs(alpha.sum() - 1.0) < 1e-12
    assert np.all(alpha >= 0)
    np.testing.assert_allclose(alpha, ref_softmax(sims, tau), rtol=1e-12)
    # Order preserved: more similar experts never get less weight.
    assert np.all(np.diff(alpha[np.argsort(sims)]) >= 0)


def test_softmax_weights_stable_for_extreme_logits() -> None:
    # sims/τ = 1e6: a naive exp() overflows to inf and gives nan.
    alpha = softmax_weights(np.array([1.0, 0.999, -1.0]), tau=1e-6)
    assert np.all(np.isfinite(alpha))
    np.testing.assert_allclose(alpha, [1.0, 0.0, 0.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties of the prior
# ---------------------------------------------------------------------------------------------


def test_k1_returns_exactly_that_expert(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    prior = aggregate_experts(bank, query, k=1, tau=0.05)
    row = bank.row_of(prior.trace.expert_ids[0])
    assert row == int(np.argmax(bank.embeddings @ query))
    assert prior.trace.weights == [1.0]
    assert torch.equal(prior.mu, bank.mu[row])
    assert torch.equal(prior.var, bank.var[row])


@pytest.mark.parametrize("k", [2, 4, 9])
def test_variance_equals_second_moment_minus_mean_squared(bank: ExpertBank, rng: np.random.Generator, k: int) -> None:
    """Var of the mixture = E_k[σ²_k + µ_k²] − µ*², a different route to the same number."""
    query = unit_rows(rng, 1, EMB)[0]
    prior = aggregate_experts(bank, query, k=k, tau=0.1)
    rows = [bank.row_of(i) for i in prior.trace.expert_ids]
    alpha = np.array(prior.trace.weights)[:, None]
    mu, var = bank_arrays(bank)
    mu_star = (alpha * mu[rows]).sum(0)
    second_moment = (alpha * (var[rows] + mu[rows] ** 2)).sum(0)
    np.testing.assert_allclose(prior.var.numpy(), second_moment - mu_star**2, rtol=1e-4, atol=1e-5)
    # The mixture is at least as spread as its average component (between-expert term >= 0).
    assert np.all(prior.var.numpy() >= (alpha * var[rows]).sum(0) - 1e-5)


def test_uniform_prior_equals_pooled_checkpoint_statistics(rng: np.random.Generator) -> None:
    """With equal checkpoint counts, uniform weights give the mean/variance of all checkpoints
    pooled together: a check of the total-variance formula from raw samples."""
    n_experts, n_ckpt = 5, 30
    ckpts = rng.standard_normal((n_experts, n_ckpt, D)) * rng.uniform(0.1, 2, (n_experts, 1, D)) + (
        rng.standard_normal((n_experts, 1, D)) * 3
    )
    embeddings = unit_rows(rng, n_experts, EMB)
    bank = ExpertBank(
        ids=[str(i) for i in range(n_experts)],
        descriptions=[""] * n_experts,
        mu=torch.from_numpy(ckpts.mean(1)).float(),
        var=torch.from_numpy(ckpts.var(1)).float(),  # ddof=0, as the pooled variance below
        embeddings=embeddings,
        index=build_index(embeddings),
    )
    prior = uniform_prior(bank, range(n_experts))
    pooled = ckpts.reshape(-1, D)
    np.testing.assert_allclose(prior.mu.numpy(), pooled.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prior.var.numpy(), pooled.var(0), rtol=1e-4, atol=1e-5)
    assert prior.trace.weights == pytest.approx([1 / n_experts] * n_experts)
    assert prior.trace.similarities == [] and prior.trace.routed_by == "all"


def test_uniform_prior_over_routed_topk_matches_reference(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    rows, sims = route(bank, query, k=4)
    prior = uniform_prior(bank, rows, query=query, routed_by="cosine")  # AdapterSoup
    mu, var = bank_arrays(bank)
    mu_ref, var_ref = ref_mixture(mu[rows], var[rows], np.full(4, 0.25))
    np.testing.assert_allclose(prior.mu.numpy(), mu_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prior.var.numpy(), var_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prior.trace.similarities, sims, atol=1e-5)
    assert prior.trace.reasons()[1] == f"2nd-nearest description in the library (cosine {sims[1]:.3f}); " \
                                       "equal weight 1/4"


def test_trace_to_dict_is_json_ready(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    trace = aggregate_experts(bank, query, k=3).trace
    d = json.loads(json.dumps(trace.to_dict()))
    assert d["expert_ids"] == trace.expert_ids
    assert len(d["similarities"]) == len(d["weights"]) == len(d["reasons"]) == 3
    assert "max_similarity" not in d  # coverage has one definition (aggregator.coverage), not the routed experts' max
    assert d["routed_by"] == "cosine" and d["reasons"][0].startswith(f"nearest description in the library (cosine "
                                                                       f"{trace.similarities[0]:.3f}); weight ")


def test_coverage_is_the_best_cosine_to_any_expert(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    cosines = bank.embeddings.astype(np.float64) @ query.astype(np.float64)
    assert coverage(bank, query) == pytest.approx(cosines.max(), abs=1e-6)
    best = bank.ids[int(cosines.argmax())]
    assert coverage(bank, query, exclude=(best,)) == pytest.approx(np.sort(cosines)[-2], abs=1e-6)


def test_reasons_say_a_gain_routed_expert_was_chosen_for_its_gain_not_its_cosine() -> None:
    trace = AggregationTrace(["pink-star", "green-ring"], ["a photo of a pink star", "a photo of a green ring"],
                             similarities=[0.99, 0.97], weights=[0.7, 0.3], predicted_gains=[5.5, 1.25],
                             routed_by="predicted_gain")
    assert trace.reasons() == [
        "highest predicted gain in the library (+5.50 mR@1 points), cosine 0.990; weight 0.700 (softmax of gain/τ)",
        "2nd-highest predicted gain in the library (+1.25 mR@1 points), cosine 0.970; weight 0.300 (softmax of gain/τ)"]
    assert "transfer router predicts" in trace.to_dict()["routing"]


# ---------------------------------------------------------------------------------------------
# Exclusion (leave-self-out conditioning)
# ---------------------------------------------------------------------------------------------


def test_exclude_leaves_named_experts_out(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = bank.embeddings[3]  # expert 3 is its own best match ...
    assert aggregate_experts(bank, query, k=4).trace.expert_ids[0] == "expert-3"
    excluded = ["expert-3", "expert-7", "expert-11"]
    prior = aggregate_experts(bank, query, k=4, tau=0.05, exclude=excluded)
    assert not set(prior.trace.expert_ids) & set(excluded)  # ... but not when excluded

    # Same answer as the reference run on a library that never had those experts.
    keep = np.array([i for i in bank.ids if i not in excluded])
    keep_rows = np.array([bank.row_of(i) for i in keep])
    rows_ref, sims_ref = ref_topk(bank.embeddings[keep_rows], query, 4)
    assert prior.trace.expert_ids == keep[rows_ref].tolist()
    mu, var = bank_arrays(bank)
    mu_ref, var_ref = ref_mixture(mu[keep_rows][rows_ref], var[keep_rows][rows_ref], ref_softmax(sims_ref, 0.05))
    np.testing.assert_allclose(prior.mu.numpy(), mu_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prior.var.numpy(), var_ref, rtol=1e-4, atol=1e-5)


def test_exclude_everything_but_k(bank: ExpertBank, rng: np.random.Generator) -> None:
    excluded = bank.ids[: E - 2]
    rows, _ = route(bank, unit_rows(rng, 1, EMB)[0], k=2, exclude=excluded)
    assert sorted(rows) == [E - 2, E - 1]


def test_exclude_unknown_id_is_a_no_op(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    assert route(bank, query, k=E, exclude=["not-an-expert"])[0] == route(bank, query, k=E)[0]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "exclude"), [(0, ()), (-1, ()), (E + 1, ()), (E, ("expert-0",)), (E - 1, ("expert-0", "expert-1"))]
)
def test_k_out_of_range_raises(bank: ExpertBank, rng: np.random.Generator, k: int, exclude) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    with pytest.raises(ValueError, match=rf"k={k}\b.*{E} experts"):
        aggregate_experts(bank, query, k=k, exclude=exclude)


@pytest.mark.parametrize("tau", [0.0, -0.05, float("nan"), float("inf")])
def test_bad_tau_raises(bank: ExpertBank, rng: np.random.Generator, tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        softmax_weights(np.array([0.1, 0.2]), tau)
    with pytest.raises(ValueError, match="tau"):
        aggregate_experts(bank, unit_rows(rng, 1, EMB)[0], k=2, tau=tau)


def test_unnormalised_or_misshapen_query_raises(bank: ExpertBank, rng: np.random.Generator) -> None:
    query = unit_rows(rng, 1, EMB)[0]
    with pytest.raises(ValueError, match="normalised"):
        route(bank, query * 2, k=2)
    with pytest.raises(ValueError, match="shape"):
        route(bank, query[:-1], k=2)


def test_short_faiss_result_raises(bank: ExpertBank, rng: np.random.Generator) -> None:
    """An approximate index may pad with id -1; that must be an error, not row -1 (the last expert)."""

    class ShortIndex:
        ntotal = E

        def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            rows = np.full((1, k), -1, dtype=np.int64)
            rows[0, :2] = [5, 6]
            sims = np.where(rows >= 0, 0.5, -np.inf).astype(np.float32)
            return sims, rows

    short = ExpertBank(bank.ids, bank.descriptions, bank.mu, bank.var, bank.embeddings, ShortIndex())
    with pytest.raises(ValueError, match="returned only 2"):
        route(short, unit_rows(rng, 1, EMB)[0], k=4)


def test_bank_rejects_inconsistent_fields(bank: ExpertBank) -> None:
    with pytest.raises(ValueError, match="disagree"):
        ExpertBank(bank.ids[:-1], bank.descriptions, bank.mu, bank.var, bank.embeddings, bank.index)
    with pytest.raises(ValueError, match="unique"):
        ExpertBank(["x"] * E, bank.descriptions, bank.mu, bank.var, bank.embeddings, bank.index)


def test_uniform_prior_rejects_bad_indices(bank: ExpertBank) -> None:
    with pytest.raises(ValueError, match="at least one"):
        uniform_prior(bank, [])
    with pytest.raises(ValueError, match=str(E)):
        uniform_prior(bank, [0, E])


# ---------------------------------------------------------------------------------------------
# Index construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "HNSW16,Flat"])
def test_build_index_finds_exact_matches(rng: np.random.Generator, factory: str) -> None:
    embeddings = unit_rows(rng, 500, EMB)
    index = build_index(embeddings, factory)
    assert index.ntotal == 500
    sims, rows = index.search(embeddings, 3)
    np.testing.assert_array_equal(rows[:, 0], np.arange(500))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)  # inner product = cosine
    assert np.all(sims[:, 1] < 1.0 - 1e-4)


def test_build_index_with_training_factory(rng: np.random.Generator) -> None:
    embeddings = unit_rows(rng, 400, EMB)
    index = build_index(embeddings, "IVF4,Flat")
    index.nprobe = 4  # probe every list: exact
    _, rows = index.search(embeddings[:50], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(50))


def test_aggregate_through_hnsw_bank(rng: np.random.Generator) -> None:
    bank = make_bank(rng, factory="HNSW32")
    query = unit_rows(rng, 1, EMB)[0]
    rows_ref, _ = ref_topk(bank.embeddings, query, 4)
    assert aggregate_experts(bank, query, k=4).trace.expert_ids == [bank.ids[r] for r in rows_ref]


def test_build_index_rejects_unnormalised_embeddings(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="normalised"):
        build_index(unit_rows(rng, 10, EMB) * 3)
    with pytest.raises(ValueError, match="shape"):
        build_index(np.zeros((0, EMB), dtype=np.float32))
