"""Which FAISS index routes descriptions to experts, by library size, and how close to exact it is.

Exact inner-product search (`Flat`) up to EXACT_UP_TO experts; above, HNSW up to HNSW_UP_TO, then IVF with
4-bit fast-scan PQ and exact re-ranking (`_approximate` says why). The search breadth (efSearch; nprobe and the
re-ranked short list) is tuned at build time to the cheapest setting that reaches RECALL_TARGET recall@4 against
exact search on held-out queries. The measured recall is recorded with the index (store manifest,
GET /experts) so nobody has to take the approximation on trust.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import faiss
import numpy as np

from app.ml.aggregator import build_index

EXACT_UP_TO = 4096  # exact search of 512-d rows: 0.2 ms at 4k, 1 ms at 10k (out of cache); HNSW32 at 10k: 0.06 ms
RECALL_TARGET = 0.97  # recall@4 an approximate index is tuned to on held-out queries (the bar is 0.95)
TUNING_QUERIES = 200


@dataclass(frozen=True)
class IndexSpec:
    factory: str  # faiss index_factory string
    search: str | None = None  # faiss ParameterSpace string, e.g. "nprobe=16"
    tune: tuple[str, ...] = ()  # search settings to try at build time, cheapest first (the first on target is kept)

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"


def choose_index(n: int, policy: str | dict = "auto", dim: int = 512) -> IndexSpec:
    """The index for a library of n experts. `policy`: "auto" (by size, see the module doc), any other string
    (a faiss factory used as is), or a recorded {"factory", "search"} dict."""
    if isinstance(policy, dict):
        return IndexSpec(policy["factory"], policy.get("search"))
    if policy != "auto":
        return IndexSpec(policy)
    if n <= EXACT_UP_TO:
        return IndexSpec("Flat")
    return _approximate(n, dim)


HNSW_UP_TO = 300_000  # HNSW builds in ~n log n with a large constant: past this its build outgrows the budget
EF_SEARCH = (16, 32, 64, 128, 256)


def _approximate(n: int, dim: int) -> IndexSpec:
    """HNSW (graph, every vector kept exact) while its build is affordable; above, IVF with 4-bit fast-scan PQ codes
    (a short list found by SIMD table look-ups) re-ranked exactly on the stored vectors (RFlat)."""
    if n <= HNSW_UP_TO:
        return IndexSpec("HNSW32", tune=tuple(f"efSearch={ef}" for ef in EF_SEARCH))
    nlist = 1 << int(round(np.log2(np.sqrt(n))))  # 1M -> 1024 lists
    pq = dim // 4 if dim % 4 == 0 else dim  # 4 dimensions per 4-bit code: 128 codes of 512 dims
    grid = [f"nprobe={p},k_factor_rf={f}" for p in (8, 16, 32, 64, 128) for f in (8, 16, 32)]
    return IndexSpec(f"IVF{nlist},PQ{pq}x4fs,RFlat", tune=tuple(grid))


def fit_index(embeddings: np.ndarray, policy: str | dict = "auto", k: int = 4) -> tuple[faiss.Index, IndexSpec, float]:
    """(index over embeddings [E, e], the spec it was built with (search breadth filled in), recall@k vs exact)."""
    spec = choose_index(len(embeddings), policy, embeddings.shape[1])
    index = build_index(embeddings, spec.factory, spec.search)
    if spec.exact:
        return index, spec, 1.0
    queries = held_out_queries(embeddings, TUNING_QUERIES)
    truth = exact_top(embeddings, queries, k)  # once: every candidate setting is scored against the same truth
    for search in spec.tune:
        faiss.ParameterSpace().set_index_parameters(index, search)
        spec = replace(spec, search=search)
        if recall_of(index, queries, truth) >= RECALL_TARGET:
            break
    return index, replace(spec, tune=()), recall_of(index, queries, truth)


def exact_top(embeddings: np.ndarray, queries: np.ndarray, k: int = 4) -> np.ndarray:
    """[n, k] rows of the exact top-k for each query."""
    # faiss.knn scans `embeddings` in place: no second copy of a million-row matrix just to measure against.
    _, truth = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                         np.ascontiguousarray(embeddings, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return truth


def recall_of(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries."""
    k = truth.shape[1]
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth.tolist(), found.tolist(), strict=True)]))


def held_out_queries(embeddings: np.ndarray, n: int, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """[n, e] normalised queries: library embeddings plus noise, as a new description near existing ones is."""
    rng = np.random.default_rng(seed)
    base = embeddings[rng.integers(0, len(embeddings), size=n)].astype(np.float32)
    q = base + noise * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.shape[1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_against_exact(index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int = 4) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries."""
    return recall_of(index, queries, exact_top(embeddings, queries, k))
