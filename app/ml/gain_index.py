"""The transfer router's ranking as a FAISS maximum-inner-product search over a rank-r embedding of the experts.

The router predicts ĝ(e | d*) = b + u(d*) · z_e with z_e a rank-r embedding of expert e (r ≤ the number of seen
tasks; app/ml/transfer_router.py). The z_e of a library are computed once; a request computes u(d*) (O(T·r), no
term per expert), asks FAISS for a short list of the best z_e (excluded experts left out by an IDSelector inside
the search), and re-scores only that short list in float64 (b + z_e · u, the router's own prediction up to
round-off), so the top-K equals the exhaustive ranking (ties broken by library row, as a stable sort does).

The index is exact (`IndexFlatIP`): r ≤ T numbers per expert (40 on a validated store, against 512 for the
description embeddings), so a scan of 100k experts reads 16 MB. An approximate MIPS index (HNSW over the
MIPS-to-NN reduction) lost the true top-4 on a synthetic router at 100k experts (0.58 of them kept) and is not used.
"""

from __future__ import annotations

from collections.abc import Collection

import faiss
import numpy as np

from app.ml import index_search
from app.ml.transfer_router import TransferRouter

SHORT_LIST = 8  # candidates re-scored in float64 per expert asked for (at least 32): absorbs float32 search error


class GainIndex:
    """Top experts by predicted gain for a fixed library (the one the router was validated on)."""

    def __init__(self, router: TransferRouter, expert_embeddings_ne: np.ndarray):
        self.router, self.embeddings = router, expert_embeddings_ne
        self.z_nr = router.expert_embeddings(expert_embeddings_ne)  # float64: the re-scoring's exact terms
        self.index = faiss.IndexFlatIP(self.z_nr.shape[1])
        self.index.add(np.ascontiguousarray(self.z_nr, dtype=np.float32))

    def __len__(self) -> int:
        return self.index.ntotal

    def top(self, query_e: np.ndarray, k: int, excluded_rows: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(rows [≤k], predicted gains [≤k]) of the best experts for `query_e`, best first."""
        u_r = self.router.query_embedding(query_e)
        short = min(max(SHORT_LIST * k, 32), len(self))
        _, rows_1s = index_search.search(self.index, u_r[None].astype(np.float32), short, excluded_rows)
        rows_s = rows_1s[0][rows_1s[0] >= 0]
        gains_s = self.router.bias + self.z_nr[rows_s] @ u_r
        order = np.lexsort((rows_s, -gains_s))[:k]  # by gain, ties by row: the exhaustive stable sort's order
        return rows_s[order], gains_s[order]
