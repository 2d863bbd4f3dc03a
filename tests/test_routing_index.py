"""Index choice by library size: exact, then HNSW, then IVF-PQ with exact re-ranking, tuned to a recall target."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from app.ml import routing_index
from app.ml.routing_index import (
    EXACT_UP_TO,
    HNSW_UP_TO,
    RECALL_TARGET,
    choose_index,
    fit_index,
    held_out_queries,
    recall_against_exact,
)


def clustered(n: int, width: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 50, width)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_up_to_the_threshold_then_hnsw_then_ivf_pq_with_exact_re_ranking():
    assert choose_index(EXACT_UP_TO).factory == "Flat"
    assert choose_index(EXACT_UP_TO + 1).factory == "HNSW32" and choose_index(HNSW_UP_TO).factory == "HNSW32"
    assert choose_index(10**6).factory == "IVF1024,PQ128x4fs,RFlat"
    assert choose_index(10**6, "HNSW32").factory == "HNSW32"  # an explicit factory is used as is
    assert choose_index(5, {"factory": "IVF4,Flat", "search": "nprobe=2"}).search == "nprobe=2"


@pytest.mark.parametrize("kind", ["HNSW", "IVF-PQ"])
def test_approximate_index_is_tuned_to_the_recall_target_on_held_out_queries(monkeypatch, kind):
    if kind == "IVF-PQ":  # the million-expert index, on a library small enough for a unit test
        monkeypatch.setattr(routing_index, "HNSW_UP_TO", EXACT_UP_TO)
    embeddings = clustered(EXACT_UP_TO + 5000)
    index, spec, recall = fit_index(embeddings, "auto")
    assert spec.factory.startswith(kind.split("-")[0]) and spec.search and not spec.tune
    assert recall >= RECALL_TARGET
    # On other queries than those it was tuned on, it still holds (with a margin for the sample).
    other = held_out_queries(embeddings, 300, seed=11)
    assert recall_against_exact(index, embeddings, other) >= RECALL_TARGET - 0.03
    # And it is a real approximation: the narrowest search finds less.
    faiss.ParameterSpace().set_index_parameters(index, "efSearch=1" if kind == "HNSW" else "nprobe=1,k_factor_rf=1")
    assert recall_against_exact(index, embeddings, other) < recall
