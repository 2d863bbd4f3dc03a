"""FAISS search that leaves given rows out: the exclusion happens inside the index (an IDSelector), so a request
costs what the index's search costs, whatever the size of the library or of the exclusion.

faiss takes per-call search parameters of the index's own type (SearchParametersIVF for IVF, ...HNSW for HNSW,
IndexRefineSearchParameters around a refined index), and parameters passed per call *replace* the index's own
settings (an IVF index searched with params probes params.nprobe, default 1), so the parameters built here copy
the index's tuned breadth (nprobe, efSearch, k_factor) beside the selector.
"""

from __future__ import annotations

from collections.abc import Collection

import faiss
import numpy as np


def _params_for(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(k_factor=index.k_factor,
                                                 base_index_params=_params_for(index.base_index, selector))
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=_params_for(index.index, selector))
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe, max_codes=ivf.max_codes)
    return faiss.SearchParameters(sel=selector)


def search(index: faiss.Index, queries_ne: np.ndarray, k: int,
           excluded_rows: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n, k], rows [n, k]) of the k best rows for each query, never one of `excluded_rows`; faiss pads
    with row -1 (score -inf) where it finds fewer."""
    queries_ne = np.ascontiguousarray(queries_ne, dtype=np.float32)
    if not excluded_rows:
        return index.search(queries_ne, k)
    excluded = faiss.IDSelectorBatch(np.fromiter(excluded_rows, dtype=np.int64, count=len(excluded_rows)))
    selector = faiss.IDSelectorNot(excluded)
    params = _params_for(index, selector)
    scores, rows = index.search(queries_ne, k, params=params)
    del params, selector, excluded  # faiss holds raw pointers to them until here
    return scores, rows
