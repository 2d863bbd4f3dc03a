"""Few-shot refinement (app/ml/fewshot.py) on the random-init tiny model: contracts, not trained numbers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from app.ml.delta_merge import merge_delta_mean, merge_delta_space
from app.ml.fewshot import (
    METHODS,
    STOP_CHECK,
    STOP_FEW,
    STOP_SMALL,
    STOP_STEPS,
    STOP_TIME,
    Examples,
    FewShotConfig,
    _Objective,
    refine,
    split_fit_check,
)
from app.ml.lora import LoRAConfig, inject_lora, shared_init

LORA = LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text"))


@pytest.fixture
def setup(tiny_backbone):
    torch.set_num_threads(1)  # a few tiny forwards: threads only contend with the rest of the machine
    layout = inject_lora(tiny_backbone.model, LORA)
    g = torch.Generator().manual_seed(1)
    candidates = shared_init(layout, LORA)[None] + 0.05 * torch.randn(4, layout.D, generator=g)
    start = 0.5 * candidates[0]
    n = 8
    size = tiny_backbone.image_size
    examples = Examples(torch.randn(n, 3, size, size, generator=g),
                        tiny_backbone.tokenize([f"a {c} square at the {p}" for c, p in
                                                itertools.islice(itertools.product(
                                                    ("red", "blue", "green", "white"), ("top", "bottom")), n)]))
    return tiny_backbone, layout, start, candidates, examples


def test_split_is_a_partition_into_halves():
    fit, check = split_fit_check(9, seed=3)
    assert sorted(torch.cat([fit, check]).tolist()) == list(range(9))
    assert (len(fit), len(check)) == (5, 4)


def test_too_few_examples_leave_the_start_unchanged(setup):
    backbone, layout, start, candidates, examples = setup
    result = refine(backbone, layout, LORA.scale, start, candidates, examples.subset(torch.arange(3)))
    assert torch.equal(result.vector, start)
    assert result.steps == 0 and STOP_FEW in result.stop_reason and result.loss_after is None


def test_side_by_side_factors_are_the_weighted_sum_of_updates(setup):
    """of_weights(e_j) is adapter j exactly; the served merge of e_j is adapter j (rank r: truncation exact)."""
    backbone, layout, start, candidates, examples = setup
    stack = torch.cat([start[None], candidates])
    obj = _Objective(backbone, layout, LORA.scale, stack)
    with torch.no_grad():
        for j in (0, 2):
            w = torch.zeros(len(stack))
            w[j] = 1.0
            assert float(obj.of_weights(w, examples)) == pytest.approx(float(obj.of_vector(stack[j], examples)),
                                                                       abs=1e-4)
            assert float(obj.of_vector(obj.merged(w), examples)) == pytest.approx(
                float(obj.of_vector(stack[j], examples)), abs=1e-4)


def test_merge_delta_mean_is_merge_delta_space_without_variance(setup):
    _, layout, _, candidates, _ = setup
    alpha = np.array([0.5, 0.2, 0.2, 0.1])
    mu, _ = merge_delta_space(layout, LORA.scale, candidates, torch.zeros_like(candidates), alpha)
    assert torch.allclose(merge_delta_mean(layout, LORA.scale, candidates, alpha), mu, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_refinement_keeps_the_best_checked_adapter(setup, method):
    """Whatever the method, the served adapter checks no worse than the description-only one it started from."""
    backbone, layout, start, candidates, examples = setup
    config = FewShotConfig(method=method, max_steps=4, patience=2)
    result = refine(backbone, layout, LORA.scale, start, candidates, examples, config, ["a", "b", "c", "d"])
    assert result.vector.shape == start.shape and torch.isfinite(result.vector).all()
    assert result.check_loss_after <= result.check_loss_before
    assert 1 <= result.steps <= (len(candidates) + 1 if method == "select" else 4)  # select: one per adapter
    assert result.stop_reason.split(";")[0] in (STOP_CHECK, STOP_STEPS, STOP_TIME)
    assert result.stopped_early == (result.stop_reason.split(";")[0] != STOP_STEPS)
    assert result.examples == 8 and result.candidate_ids == ["a", "b", "c", "d"]
    if method != "factors":
        assert result.weights is None or len(result.weights) == 5


def test_a_small_improvement_on_the_check_half_serves_the_description_only_adapter(setup):
    backbone, layout, start, candidates, examples = setup
    result = refine(backbone, layout, LORA.scale, start, candidates, examples,
                    FewShotConfig(max_steps=3, min_improvement=0.99))
    assert torch.equal(result.vector, start) and result.weights is None
    assert result.check_loss_after == result.check_loss_before and STOP_SMALL in result.stop_reason


def test_time_budget_stops_after_the_step_that_spent_it(setup):
    backbone, layout, start, candidates, examples = setup
    ticks = itertools.count(0.0, 10.0)  # every reading of the clock is 10 s later
    result = refine(backbone, layout, LORA.scale, start, candidates, examples,
                    FewShotConfig(time_budget_s=5.0, max_steps=50, patience=50), clock=lambda: next(ticks))
    assert result.stop_reason.startswith(STOP_TIME) and result.stopped_early and result.steps == 1


def test_config_refuses_what_cannot_check():
    with pytest.raises(ValueError, match="min_examples"):
        FewShotConfig(min_examples=2)
    with pytest.raises(ValueError, match="unknown few-shot method"):
        FewShotConfig(method="sgd")
