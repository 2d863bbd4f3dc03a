"""ΔW-space merging, the transfer router and the confidence gate, on synthetic numbers (no trained store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.ml.aggregator import ExpertBank, build_index, route_by_gain
from app.ml.delta_merge import delta_weights, merge_delta_space
from app.ml.lora import LoRAConfig, layout_from_model_config
from app.ml.routing import Gate
from app.ml.transfer_router import _solve_masked_kronecker, fit_transfer_router, kernel

CONFIG = LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text"))


@pytest.fixture(scope="module")
def layout():
    import tests.conftest  # noqa: F401  registers tiny_clip

    return layout_from_model_config("tiny_clip", CONFIG)


def test_delta_merge_of_one_expert_returns_its_delta_w_exactly(layout) -> None:
    torch.manual_seed(0)
    mu_1d, var_1d = torch.randn(1, layout.D), torch.rand(1, layout.D)
    merged, var = merge_delta_space(layout, CONFIG.scale, mu_1d, var_1d, np.array([1.0]))
    expected, got = delta_weights(layout, mu_1d, CONFIG.scale), delta_weights(layout, merged[None], CONFIG.scale)
    for path in expected:
        torch.testing.assert_close(got[path], expected[path], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, var_1d[0])  # one expert: no between-expert spread, only its own


def test_delta_merge_is_the_best_rank_r_approximation_of_the_weighted_sum(layout) -> None:
    torch.manual_seed(1)
    mu_kd, var_kd = torch.randn(3, layout.D), torch.zeros(3, layout.D)
    alpha = np.array([0.5, 0.3, 0.2])
    merged, _ = merge_delta_space(layout, CONFIG.scale, mu_kd, var_kd, alpha)
    per_expert = delta_weights(layout, mu_kd.double(), CONFIG.scale)
    served = delta_weights(layout, merged[None].double(), CONFIG.scale)
    for path, dw in per_expert.items():
        target = sum(float(a) * dw[k] for k, a in enumerate(alpha))  # [3, d, d]
        singular = torch.linalg.svdvals(target)
        error = (target - served[path][0]).norm(dim=(-2, -1))
        optimum = singular[:, CONFIG.rank :].norm(dim=-1)  # Eckart–Young: nothing of rank r does better
        torch.testing.assert_close(error, optimum, rtol=1e-4, atol=1e-4)
        # and the factor-space average is a different, worse thing
        factor = delta_weights(layout, (torch.as_tensor(alpha)[:, None] * mu_kd.double()).sum(0)[None], CONFIG.scale)
        assert ((target - factor[path][0]).norm(dim=(-2, -1)) > error).all()


def test_delta_merge_variance_is_zero_when_experts_agree(layout) -> None:
    torch.manual_seed(2)
    mu = torch.randn(1, layout.D).repeat(3, 1)
    _, var = merge_delta_space(layout, CONFIG.scale, mu, torch.zeros(3, layout.D), np.array([0.2, 0.3, 0.5]))
    assert var.abs().max() < 1e-6


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def family(rng: np.random.Generator, n_colours: int = 4, n_shapes: int = 5, noise: float = 0.3):
    """Embeddings where shape is a little stronger than colour, and gains that follow colour only."""
    colours, shapes = unit(rng.normal(size=(n_colours, 16))), unit(rng.normal(size=(n_shapes, 16)))
    tasks = [(c, s) for c in range(n_colours) for s in range(n_shapes)]
    emb = unit(np.array([colours[c] + 1.2 * shapes[s] + noise * rng.normal(size=16) / 4 for c, s in tasks]))
    gains = np.array([[10.0 if ct == ce else -3.0 for ce, _ in tasks] for ct, _ in tasks])
    return tasks, emb, gains


@pytest.mark.parametrize("bandwidth", [0.0, 1.0])
def test_transfer_router_learns_what_transfers_where_cosine_does_not(bandwidth: float) -> None:
    rng = np.random.default_rng(0)
    tasks, emb, gains = family(rng)
    held = [i for i, (c, s) in enumerate(tasks) if s == c]  # one task of every colour never fitted on
    fit = [i for i in range(len(tasks)) if i not in held]
    router = fit_transfer_router(emb[fit], emb[fit], gains[np.ix_(fit, fit)], bandwidth=bandwidth, ridge=0.1)
    by_router = by_cosine = 0
    for t in held:
        predicted = router.predict(emb[t], emb[fit])
        by_router += tasks[fit[int(np.argmax(predicted))]][0] == tasks[t][0]
        by_cosine += tasks[fit[int(np.argmax(emb[fit] @ emb[t]))]][0] == tasks[t][0]
    assert by_router == len(held)  # every new task routed to an expert of its colour
    assert by_cosine < len(held)  # plain cosine confuses colour with shape on this family


def test_masked_kronecker_solve_matches_the_dense_system() -> None:
    rng = np.random.default_rng(3)
    a, b = unit(rng.normal(size=(6, 5))), unit(rng.normal(size=(7, 5)))
    K_tt, K_ee = kernel(a, a, 0.2), kernel(b, b, 0.2)
    y, mask = rng.normal(size=(6, 7)), rng.random((6, 7)) < 0.6
    beta = _solve_masked_kronecker(K_tt, K_ee, np.where(mask, y, 0.0), mask.astype(float), ridge=0.5)
    observed = np.flatnonzero(mask.ravel())
    dense = np.kron(K_tt, K_ee)[np.ix_(observed, observed)] + 0.5 * np.eye(len(observed))
    np.testing.assert_allclose(beta.ravel()[observed], np.linalg.solve(dense, y.ravel()[observed]), atol=1e-6)
    assert np.all(beta[~mask] == 0)


def test_route_by_gain_orders_by_gain_and_respects_exclusion() -> None:
    rng = np.random.default_rng(4)
    emb = unit(rng.normal(size=(5, 8))).astype(np.float32)
    bank = ExpertBank([f"e{i}" for i in range(5)], ["d"] * 5, torch.zeros(5, 3), torch.zeros(5, 3), emb,
                      build_index(emb))
    rows, gains, sims = route_by_gain(bank, np.array([1.0, 5.0, 3.0, 5.0, -1.0]), emb[0], k=3, exclude=("e1",))
    assert rows == [3, 2, 0] and list(gains) == [5.0, 3.0, 1.0]
    np.testing.assert_allclose(sims, emb[rows] @ emb[0], rtol=1e-6)
    with pytest.raises(ValueError, match="k=5 is out of range"):
        route_by_gain(bank, np.zeros(5), emb[0], k=5, exclude=("e1",))


def test_gate_reasons() -> None:
    gate = Gate(min_coverage=0.8, min_predicted_gain=0.0)
    assert gate.check(0.9, 2.0) is None
    assert "far from every expert" in gate.check(0.5, 2.0)
    assert "no expert is predicted to help" in gate.check(0.9, -0.1)
    assert gate.check(0.9, None) is None  # no router: coverage alone decides


def test_full_grid_kronecker_solve_matches_the_dense_system() -> None:
    rng = np.random.default_rng(5)
    a, b = unit(rng.normal(size=(8, 5))), unit(rng.normal(size=(6, 5)))
    K_tt, K_ee = kernel(a, a, 0.5), kernel(b, b, 0.5)
    y = rng.normal(size=(8, 6))
    beta = _solve_masked_kronecker(K_tt, K_ee, y, np.ones_like(y), ridge=0.3)  # every pair observed: closed form
    dense = np.kron(K_tt, K_ee) + 0.3 * np.eye(48)
    np.testing.assert_allclose(beta.ravel(), np.linalg.solve(dense, y.ravel()), atol=1e-8)


def worded_family(rng: np.random.Generator, wordings: int = 6, wording_strength: float = 1.5):
    """`family` whose descriptions also move along a few wording directions, as phrasings of one task do."""
    tasks, emb, gains = family(rng)
    nuisance = unit(rng.normal(size=(3, 16)))
    worded = [unit(emb[i] + wording_strength * rng.normal(size=(wordings, 3)) @ nuisance) for i in range(len(tasks))]
    return tasks, emb, gains, worded


def test_router_fitted_on_wordings_routes_new_wordings_by_colour() -> None:
    rng = np.random.default_rng(6)
    tasks, emb, gains, worded = worded_family(rng)
    held = [i for i, (c, s) in enumerate(tasks) if s == c]
    fit = [i for i in range(len(tasks)) if i not in held]
    rows = np.repeat(fit, [len(worded[i]) for i in fit])
    on_wordings = fit_transfer_router(np.concatenate([worded[i] for i in fit]), emb[fit], gains[np.ix_(rows, fit)],
                                      ridge=0.1, shrinkage=0.1, groups=rows)
    on_templates = fit_transfer_router(emb[fit], emb[fit], gains[np.ix_(fit, fit)], ridge=0.1, shrinkage=0.1)

    def right_colour(router) -> float:
        hits = [tasks[fit[int(np.argmax(router.predict(q, emb[fit])))]][0] == tasks[t][0]
                for t in held for q in worded[t]]
        return float(np.mean(hits))

    assert right_colour(on_wordings) >= 0.9
    assert right_colour(on_wordings) > right_colour(on_templates)


def test_domain_distance_separates_new_in_domain_tasks_from_other_text() -> None:
    from app.ml.domain_gate import fit_domain

    rng = np.random.default_rng(7)
    tasks, _, _, worded = worded_family(rng, wording_strength=0.5)
    held = [i for i, (c, s) in enumerate(tasks) if s == c]
    domain = fit_domain(np.concatenate([worded[i] for i in range(len(tasks)) if i not in held]), shrinkage=0.1)
    inside = domain.distance(np.concatenate([worded[i] for i in held]))
    outside = domain.distance(unit(rng.normal(size=(20, 16))))  # text from elsewhere: off the family's subspace
    assert np.quantile(inside, 0.95) < np.quantile(outside, 0.05)


def test_gate_reasons_with_a_domain_threshold() -> None:
    gate = Gate(min_coverage=None, min_predicted_gain=0.0, max_domain_distance=2.0,
                domain_calibration={"in_domain_gated": 0.05})
    assert gate.check(0.1, 2.0, domain_distance=1.5) is None  # coverage is not checked when a domain is
    assert "far from every expert's domain" in gate.check(0.9, 2.0, domain_distance=2.5)
    assert "5 %" in gate.check(0.9, 2.0, domain_distance=2.5)
    assert "no expert is predicted to help" in gate.check(0.9, -1.0, domain_distance=1.0)


def test_per_task_domain_measures_distance_to_the_nearest_task_under_wording_covariance() -> None:
    from app.ml.domain_gate import DomainModel, fit_domain

    rng = np.random.default_rng(8)
    tasks, emb, _, worded = worded_family(rng, wording_strength=0.5)
    groups = np.repeat(np.arange(len(tasks)), [len(w) for w in worded])
    domain = fit_domain(np.concatenate(worded), shrinkage=0.1, groups=groups)
    assert domain.centres.shape == (len(tasks), 16)
    np.testing.assert_allclose(domain.centres[3], worded[3].mean(axis=0))
    # a task's own wordings are nearer to the domain than anything off the family's subspace
    assert domain.distance(worded[3]).max() < np.quantile(domain.distance(unit(rng.normal(size=(20, 16)))), 0.05)
    again = DomainModel.from_tensors(domain.to_tensors())
    np.testing.assert_allclose(again.distance(worded[5]), domain.distance(worded[5]))
