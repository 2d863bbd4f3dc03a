"""The transfer router's ranking as a FAISS maximum-inner-product search: per-request cost independent of E.

The router predicts ĝ(e | d*) = b + u(d*) · z_e with z_e a rank-r embedding of expert e (r ≤ the number of seen
tasks; app/ml/transfer_router.py). The z_e of a library are computed once; a request computes u(d*) (O(T·r)),
asks FAISS for a short list of the best z_e (excluded experts left out by an IDSelector inside the search), and
re-scores only that short list with the router's exact float64 prediction, so the gains it reports are the
router's own and the top-K equals the exhaustive ranking (ties broken by library row, as a stable sort does).

Index by size: exact (`IndexFlatIP`) up to EXACT_UP_TO experts; above, HNSW over the standard MIPS-to-nearest-
neighbour reduction (Bachrach et al. 2014: append √(M² − ‖z‖²) to every z_e and 0 to the query, so all experts
have norm M and the largest inner product is the nearest neighbour, which HNSW is built for).
"""

from __future__ import annotations

from collections.abc import Collection

import faiss
import numpy as np

from app.ml import index_search
from app.ml.transfer_router import TransferRouter

EXACT_UP_TO = 20_000  # 20k x r (≤ ~64) floats scan in well under a millisecond; above, HNSW keeps it flat in E
HNSW_M, HNSW_EF_SEARCH = 32, 128
SHORT_LIST = 8  # candidates re-scored exactly per expert asked for (at least 32): absorbs float32 search error


class GainIndex:
    """Top experts by predicted gain for a fixed library (the one the router was validated on)."""

    def __init__(self, router: TransferRouter, expert_embeddings_ne: np.ndarray):
        self.router, self.embeddings = router, expert_embeddings_ne
        z_nr = router.expert_embeddings(expert_embeddings_ne).astype(np.float32)
        self.exact = len(z_nr) <= EXACT_UP_TO
        self.index = _flat(z_nr) if self.exact else _hnsw_mips(z_nr)

    def __len__(self) -> int:
        return self.index.ntotal

    def top(self, query_e: np.ndarray, k: int, excluded_rows: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(rows [≤k], exact predicted gains [≤k]) of the best experts for `query_e`, best first."""
        u_r = self.router.query_embedding(query_e).astype(np.float32)
        if not self.exact:
            u_r = np.append(u_r, np.float32(0.0))  # the reduction's extra coordinate is 0 for queries
        short = max(SHORT_LIST * k, 32)
        _, rows_1s = index_search.search(self.index, u_r[None], min(short, len(self)), excluded_rows)
        rows_s = rows_1s[0][rows_1s[0] >= 0]
        gains_s = self.router.predict(query_e, self.embeddings[rows_s])
        order = np.lexsort((rows_s, -gains_s))[:k]  # by gain, ties by row: the exhaustive stable sort's order
        return rows_s[order], gains_s[order]


def _flat(z_nr: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(z_nr.shape[1])
    index.add(np.ascontiguousarray(z_nr))
    return index


def _hnsw_mips(z_nr: np.ndarray) -> faiss.Index:
    norms_n = np.linalg.norm(z_nr, axis=1)
    extra_n = np.sqrt(np.maximum(norms_n.max() ** 2 - norms_n**2, 0.0)).astype(np.float32)
    index = faiss.IndexHNSWFlat(z_nr.shape[1] + 1, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(np.ascontiguousarray(np.hstack([z_nr, extra_n[:, None]])))
    return index
