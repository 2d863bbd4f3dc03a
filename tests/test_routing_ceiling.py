"""offline/routing_ceiling.py: the best single expert in hindsight, and a router told each task's attributes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from offline import routing_ceiling as ceiling

COLOURS, SHAPES = ("red", "green", "blue", "pink"), ("circle", "star", "ring")


def _library(seed: int = 0):
    """Tasks = experts = every colour-shape; an expert helps a task by 10 points when the colour matches plus a
    shape-to-shape term, and by its own quality; small noise on top."""
    rng = np.random.default_rng(seed)
    ids = [f"{c}-{s}" for c, s in itertools.product(COLOURS, SHAPES)]
    shape_term = rng.uniform(-3, 6, size=(len(SHAPES), len(SHAPES)))
    quality = rng.uniform(0, 2, size=len(ids))
    gains = np.zeros((len(ids), len(ids)))
    for (t, task), (e, expert) in itertools.product(enumerate(ids), enumerate(ids)):
        (ct, st), (ce, se) = task.split("-"), expert.split("-")
        gains[t, e] = 10 * (ct == ce) + shape_term[SHAPES.index(st), SHAPES.index(se)] + quality[e]
    gains += rng.normal(0, 0.2, size=gains.shape)
    gains[np.arange(len(ids)), np.arange(len(ids))] = 30.0  # a task's own expert: the oracle
    return ids, gains, np.ones_like(gains, dtype=bool), rng.uniform(15, 25, size=len(ids))


def test_attributes_of_two_part_names_only():
    assert ceiling.attributes("red-circle") == ("red", "circle")
    assert ceiling.attributes("traffic light") is None and ceiling.attributes("a-b-c") is None


def test_hindsight_is_the_best_other_expert_and_bounds_the_attribute_router():
    ids, gains, mask, zero_shot = _library()
    figures = ceiling.seen_ceilings(ids, ids, gains, mask, zero_shot)
    best_other = np.mean([max(g for e, g in enumerate(gains[t]) if e != t) for t in range(len(ids))])
    assert figures[ceiling.HINDSIGHT]["seen LOTO mR@1"] == pytest.approx(zero_shot.mean() + best_other)
    assert figures[ceiling.HINDSIGHT]["seen LOTO headroom"] == pytest.approx(100 * best_other / 30.0)
    attribute = figures[ceiling.ATTRIBUTES]["seen LOTO headroom"]
    assert attribute <= figures[ceiling.HINDSIGHT]["seen LOTO headroom"] + 1e-9
    # The gains follow the attributes, so a router told them finds (nearly) the best expert of a task it never saw.
    assert attribute >= 0.9 * figures[ceiling.HINDSIGHT]["seen LOTO headroom"]


def test_the_attribute_router_never_sees_the_task_it_is_scored_on():
    ids, gains, mask, _ = _library()
    held = ids.index("green-star")
    gains_leak = gains.copy()
    gains_leak[held] = -50.0  # were the left-out row used, every prediction for it would move
    gains_leak[:, held] = -50.0
    fair = ceiling.fit_attribute_router(ids, ids, gains, mask, leave_out="green-star")
    leaky = ceiling.fit_attribute_router(ids, ids, gains_leak, mask, leave_out="green-star")
    others = [e for e in ids if e != "green-star"]
    np.testing.assert_allclose(fair.predict("green-star", others), leaky.predict("green-star", others))


def test_other_data_gets_the_hindsight_row_only():
    ids, gains, mask, zero_shot = _library()
    renamed = [i.replace("-", " ") for i in ids]
    assert ceiling.fit_attribute_router(renamed, renamed, gains, mask) is None
    assert set(ceiling.seen_ceilings(renamed, renamed, gains, mask, zero_shot)) == {ceiling.HINDSIGHT}
