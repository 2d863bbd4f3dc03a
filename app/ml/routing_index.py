"""Which FAISS index routes descriptions to experts, by library size, and how close to exact it is.

Exact inner-product search (`Flat`) up to EXACT_UP_TO experts; above, an IVF index with ~√E lists whose search
breadth (nprobe) is tuned at build time to the smallest power of two that reaches RECALL_TARGET recall@4
against exact search on held-out queries. The measured recall is recorded with the index (store manifest,
GET /experts) so nobody has to take the approximation on trust.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import faiss
import numpy as np

from app.ml.aggregator import build_index

EXACT_UP_TO = 20_000  # exact search of 20k x 512 floats is ~1 ms on one core; past that an IVF index pays off
RECALL_TARGET = 0.97  # recall@4 an approximate index is tuned to on held-out queries (the bar is 0.95)
NPROBES = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class IndexSpec:
    factory: str  # faiss index_factory string
    search: str | None = None  # faiss ParameterSpace string, e.g. "nprobe=16"
    tune_nprobe: bool = False  # find `search` at build time

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"


def choose_index(n: int, policy: str | dict = "auto") -> IndexSpec:
    """The index for a library of n experts. `policy`: "auto" (by size, see the module doc), any other string
    (a faiss factory used as is), or a recorded {"factory", "search"} dict."""
    if isinstance(policy, dict):
        return IndexSpec(policy["factory"], policy.get("search"))
    if policy != "auto":
        return IndexSpec(policy)
    if n <= EXACT_UP_TO:
        return IndexSpec("Flat")
    nlist = 1 << int(round(np.log2(np.sqrt(n))))  # 100k -> 256 lists, 1M -> 1024
    return IndexSpec(f"IVF{nlist},Flat", tune_nprobe=True)


def fit_index(embeddings: np.ndarray, policy: str | dict = "auto", k: int = 4) -> tuple[faiss.Index, IndexSpec, float]:
    """(index over embeddings [E, e], the spec it was built with (search breadth filled in), recall@k vs exact)."""
    spec = choose_index(len(embeddings), policy)
    index = build_index(embeddings, spec.factory, spec.search)
    if spec.exact:
        return index, spec, 1.0
    queries = held_out_queries(embeddings, 200)
    if spec.tune_nprobe:
        nlist = faiss.extract_index_ivf(index).nlist
        for nprobe in NPROBES:
            spec = replace(spec, search=f"nprobe={min(nprobe, nlist)}", tune_nprobe=False)
            faiss.ParameterSpace().set_index_parameters(index, spec.search)
            if nprobe >= nlist or recall_against_exact(index, embeddings, queries, k) >= RECALL_TARGET:
                break
    return index, spec, recall_against_exact(index, embeddings, queries, k)


def held_out_queries(embeddings: np.ndarray, n: int, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """[n, e] normalised queries: library embeddings plus noise, as a new description near existing ones is."""
    rng = np.random.default_rng(seed)
    base = embeddings[rng.integers(0, len(embeddings), size=n)].astype(np.float32)
    q = base + noise * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.shape[1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_against_exact(index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int = 4) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries."""
    # faiss.knn scans `embeddings` in place: no second copy of a million-row matrix just to measure against.
    _, truth = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                         np.ascontiguousarray(embeddings, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth.tolist(), found.tolist(), strict=True)]))
