"""Semantic router and prior constructor of SG-LoRA (paper §3.3.1).

Given the frozen-CLIP text embedding d* of a task description, pick the top-K experts of the
library by cosine similarity, weight them by α = softmax(cos / τ), and build the task semantic
c = {µ*, σ*²}:

    µ*  = Σ_k α_k µ_k
    σ*² = Σ_k α_k σ²_k + Σ_k α_k (µ_k − µ*)²      (law of total variance)

i.e. the mean and element-wise variance of the mixture Σ_k α_k N(µ_k, σ²_k). The first term is the
experts' own checkpoint spread, the second their disagreement about where the task's LoRA lies.

Shapes: E experts, D = length of the flat LoRA vector (lora.py's layout), e = text-embedding width,
K = number of experts routed to.

Pure torch/numpy/faiss: the service and offline/ both import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from app.ml import index_search
from app.ml.gain_index import GainIndex

# Text embeddings come out of open_clip already L2-normalised in float32 (|‖x‖ − 1| ≈ 1e-7). A looser
# bound still catches the real mistake: an un-normalised embedding, whose inner products are not
# cosines and which would silently change how sharp softmax(sim/τ) is.
_NORM_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------


def _check_normalised(vectors_ne: np.ndarray, what: str) -> None:
    norms_n = np.linalg.norm(vectors_ne.astype(np.float64), axis=-1)
    worst = float(np.max(np.abs(norms_n - 1.0))) if norms_n.size else 0.0
    if not np.isfinite(worst) or worst > _NORM_TOLERANCE:
        raise ValueError(
            f"{what} must be finite and L2-normalised (cosine similarity is an inner product only "
            f"for unit vectors); largest |norm - 1| is {worst:.3g}"
        )


def build_index(embeddings: np.ndarray, factory: str = "Flat", search: str | None = None) -> faiss.Index:
    """An inner-product faiss index over expert embeddings [E, e] (float32, L2-normalised).

    `factory` is a faiss index_factory string: "Flat" is exact and right for libraries of up to
    tens of thousands of experts; "HNSW32", "IVF1024,Flat" etc. trade exactness for speed on larger
    ones (`choose_index` picks by size). `search` is a faiss ParameterSpace string ("nprobe=16").
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [E, e] matrix, got shape {embeddings.shape}")
    _check_normalised(embeddings, "expert embeddings")
    # faiss reads raw memory: it needs C-contiguous float32, whatever the caller handed over.
    embeddings_ee = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.index_factory(embeddings_ee.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:  # IVF/PQ variants learn centroids/codebooks first
        index.train(_training_sample(embeddings_ee, getattr(faiss.try_extract_index_ivf(index), "nlist", 0)))
    index.add(embeddings_ee)
    if search:
        faiss.ParameterSpace().set_index_parameters(index, search)
    return index


def _training_sample(embeddings_ee: np.ndarray, nlist: int) -> np.ndarray:
    """IVF k-means on a seeded sample of 40 rows per list: on every row of a million-expert library it would
    take minutes for no better centroids."""
    if not nlist or len(embeddings_ee) <= _IVF_TRAIN_PER_LIST * nlist:
        return embeddings_ee
    rows = np.random.default_rng(0).choice(len(embeddings_ee), _IVF_TRAIN_PER_LIST * nlist, replace=False)
    return embeddings_ee[np.sort(rows)]


_IVF_TRAIN_PER_LIST = 40  # faiss warns below 39 training points per centroid


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)  # tensors and a faiss index have no meaningful ==
class ExpertBank:
    """The expert library W_expert = {(µ_e, σ²_e, d_e)}; row i of every field is expert ids[i]."""

    ids: list[str]
    descriptions: list[str]
    mu: torch.Tensor  # [E, D] float32, mean over the expert's kept checkpoints (flat LoRA layout)
    var: torch.Tensor  # [E, D] float32, element-wise variance over those checkpoints
    embeddings: np.ndarray  # [E, e] float32, normalised text embeddings d_e of the descriptions
    index: faiss.Index  # over `embeddings`, row i <-> faiss id i
    _row_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        sizes = {
            "ids": n,
            "descriptions": len(self.descriptions),
            "mu": self.mu.shape[0],
            "var": self.var.shape[0],
            "embeddings": self.embeddings.shape[0],
            "index": self.index.ntotal,
        }
        if len(set(sizes.values())) != 1:
            raise ValueError(f"expert bank fields disagree on the number of experts: {sizes}")
        if self.mu.ndim != 2 or self.mu.shape != self.var.shape:
            raise ValueError(f"mu and var must both be [E, D]; got {tuple(self.mu.shape)} and {tuple(self.var.shape)}")
        self._row_of = {expert_id: row for row, expert_id in enumerate(self.ids)}
        if len(self._row_of) != n:
            raise ValueError("expert ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, expert_id: str) -> int:
        """Row of an expert id (KeyError if it is not in the library)."""
        return self._row_of[expert_id]

    def rows_of(self, expert_ids: Collection[str]) -> set[int]:
        """Rows of those ids that are in the library (others are ignored): costs |expert_ids|, not the library."""
        return {self._row_of[i] for i in set(expert_ids) if i in self._row_of}

    def gather(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [K, D], var [K, D]) of the given rows: reads only those rows of a memory-mapped library."""
        library = getattr(self.mu, "library", None)  # store.MappedRows: one read of both fields per row
        if library is not None:
            return library.gather(rows)
        rows_k = torch.as_tensor(list(rows), dtype=torch.long, device=self.mu.device)
        return self.mu[rows_k], self.var[rows_k]


# How a trace's experts were chosen: by the cosine of their description to the query, by the transfer router's
# predicted gain, or all of them (a model soup). Each comes with the rule a client can show in one line.
ROUTED_BY = {
    "cosine": "the experts whose descriptions are nearest the description (cosine of CLIP text embeddings)",
    "predicted_gain": "the experts the transfer router predicts help this description most (mR@1 points it "
                      "learned from measured transfer between tasks), whatever their descriptions' cosine",
    "all": "every expert of the library, equally weighted",
}


def _ranked(i: int, superlative: str) -> str:
    """0 -> "nearest", 1 -> "2nd-nearest", 10 -> "11th-nearest"."""
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return superlative if n == 1 else f"{n}{suffix}-{superlative}"


@dataclass
class AggregationTrace:
    """Which experts made a prior, how much each counted and why each was chosen: returned to clients."""

    expert_ids: list[str]
    descriptions: list[str]
    similarities: list[float]  # cosine(d*, d_k); empty when the prior was built without a query
    weights: list[float]  # α_k, sums to 1
    predicted_gains: list[float] | None = None  # transfer router: expected mR@1 gain of each expert (points)
    routed_by: str = "cosine"  # a key of ROUTED_BY

    def reasons(self) -> list[str]:
        """Why each expert is in the trace, one line each, from the numbers the choice was made on."""
        n = len(self.expert_ids)
        cos = [f"cosine {s:.3f}" for s in self.similarities] if self.similarities else ["cosine not measured"] * n
        if self.routed_by == "all":
            return [f"every expert counts in a model soup (weight 1/{n}); {c}" for c in cos]
        if self.routed_by == "predicted_gain" and self.predicted_gains is not None:
            return [f"{_ranked(i, 'highest')} predicted gain in the library ({g:+.2f} mR@1 points), {c}; "
                    f"weight {w:.3f} (softmax of gain/τ)" for i, (g, c, w) in
                    enumerate(zip(self.predicted_gains, cos, self.weights, strict=True))]
        equal = len(set(self.weights)) == 1
        return [f"{_ranked(i, 'nearest')} description in the library ({c}); "
                + (f"equal weight 1/{n}" if equal else f"weight {w:.3f} (softmax of cosine/τ)")
                for i, (c, w) in enumerate(zip(cos, self.weights, strict=True))]

    def to_dict(self) -> dict:
        gains = {} if self.predicted_gains is None else {"predicted_gains": [float(g) for g in self.predicted_gains]}
        return {
            "expert_ids": list(self.expert_ids),
            "descriptions": list(self.descriptions),
            "similarities": [float(s) for s in self.similarities],
        } | gains | {
            "weights": [float(w) for w in self.weights],
            "reasons": self.reasons(),
            "routed_by": self.routed_by,
            "routing": ROUTED_BY[self.routed_by],
        }


@dataclass(eq=False)
class SemanticPrior:
    """The task semantic c = {µ*, σ*²} that conditions the CVAE (or is used directly as a merge)."""

    mu: torch.Tensor  # [D]  µ* = Σ α_k µ_k
    var: torch.Tensor  # [D]  σ*² = Σ α_k σ²_k + Σ α_k (µ_k − µ*)²
    trace: AggregationTrace


# ----------------------------------------------------------------------------------------------
# Routing and weighting
# ----------------------------------------------------------------------------------------------


def _query_row(bank: ExpertBank, query: np.ndarray) -> np.ndarray:
    """Validate a [e] query and shape it [1, e] float32 for faiss."""
    width = bank.embeddings.shape[1]
    if query.shape not in ((width,), (1, width)):
        raise ValueError(f"query must be a [{width}] embedding, got shape {query.shape}")
    _check_normalised(query.reshape(1, width), "query embedding")
    return np.ascontiguousarray(query.reshape(1, width), dtype=np.float32)


def route(bank: ExpertBank, query: np.ndarray, k: int, exclude: Collection[str] = ()) -> tuple[list[int], np.ndarray]:
    """Top-k experts for `query` [e]: (rows into the bank, cosine similarities [k]), best first.

    `exclude` names experts that must not be picked: when the CVAE is trained on expert n, its
    condition is built from the *other* experts, as it will be for an unseen task at serving time.
    """
    # Ids not in the library exclude nothing: leave-self-out for an expert that was never added is a no-op.
    excluded = bank.rows_of(exclude)
    available = len(bank) - len(excluded)
    if not 1 <= k <= available:
        raise ValueError(
            f"k={k} is out of range: the library holds {len(bank)} experts, {len(excluded)} excluded, "
            f"so k must be between 1 and {available}"
        )
    sims_1k, rows_1k = index_search.search(bank.index, _query_row(bank, query), k, excluded)
    kept = [(int(row), float(sim)) for row, sim in zip(rows_1k[0], sims_1k[0], strict=True) if row != -1]
    if len(kept) < k:
        # faiss pads with id -1 when an approximate index (HNSW, IVF with few probes) finds fewer.
        raise ValueError(
            f"the index returned only {len(kept)} usable experts for k={k} (library of {len(bank)}); "
            f"use an exact index or raise its search breadth (efSearch / nprobe)"
        )
    rows = [row for row, _ in kept]
    sims_k = np.array([sim for _, sim in kept], dtype=np.float32)
    return rows, sims_k


def coverage(bank: ExpertBank, query: np.ndarray, exclude: Collection[str] = ()) -> float:
    """How well the library covers a description: the best cosine between `query` [e] and any expert's
    description embedding (leaving out `exclude`). THE definition: the confidence gate checks this number and
    every answer reports it (X-Coverage, `coverage`), whatever the strategy routed to. Read through the routing
    index: exact for a Flat index, the index's recall for an approximate one (app/ml/routing_index.py)."""
    return float(route(bank, query, 1, exclude)[1][0])


# The smallest temperature served: below ~5.6e-309, cos/τ overflows float64 and the weights turn NaN; far above
# that, 1e-6 already makes the softmax a hard arg-max. The API and the settings refuse anything smaller.
TAU_MIN = 1e-6


def softmax_weights(sims: np.ndarray, tau: float) -> np.ndarray:
    """α = softmax(sims / τ) as float64 [K]. A small τ (0.05) makes cosines that differ by a few
    hundredths matter; subtracting the max keeps exp() from overflowing at any τ."""
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature tau must be a finite number > 0, got {tau}")
    logits_k = np.asarray(sims, dtype=np.float64).reshape(-1) / tau
    if logits_k.size == 0 or not np.all(np.isfinite(logits_k)):
        raise ValueError(f"similarities must be a non-empty vector of finite numbers, got {sims}")
    unnormalised_k = np.exp(logits_k - logits_k.max())
    return unnormalised_k / unnormalised_k.sum()


def route_by_gain(bank: ExpertBank, gains_e: np.ndarray, query: np.ndarray, k: int,
                  exclude: Collection[str] = ()) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Top-k experts by a predicted gain per bank row [E] (app/ml/transfer_router.py): (rows, gains [k],
    cosines [k]), best first; ties broken by bank order. The cosines are reported beside the gains.

    The exhaustive reference of `route_by_gain_index` (which the service uses: it never computes E gains)."""
    gains_e = np.asarray(gains_e, dtype=np.float64)
    if gains_e.shape != (len(bank),):
        raise ValueError(f"need one predicted gain per expert ({len(bank)}), got shape {gains_e.shape}")
    excluded = bank.rows_of(exclude)
    _check_k(k, len(bank) - len(excluded))
    ranked = np.where(np.isin(np.arange(len(bank)), list(excluded)), -np.inf, gains_e)
    rows = np.argsort(-ranked, kind="stable")[:k].tolist()  # stable: ties keep bank order
    return rows, gains_e[rows], _cosines(bank, rows, query)


def route_by_gain_index(bank: ExpertBank, gain_index: GainIndex, query: np.ndarray, k: int,
                        exclude: Collection[str] = ()) -> tuple[list[int], np.ndarray, np.ndarray]:
    """`route_by_gain` with the gains of the transfer router behind `gain_index`, at a cost independent of the
    library's size: an inner-product search over the router's expert embeddings, exact re-scoring of a short
    list. Same (rows, gains [k], cosines [k]), best first."""
    excluded = bank.rows_of(exclude)
    _check_k(k, len(bank) - len(excluded))
    rows_k, gains_k = gain_index.top(query, k, excluded)
    if len(rows_k) < k:
        raise ValueError(f"the gain index returned only {len(rows_k)} experts for k={k} (library of {len(bank)})")
    rows = rows_k.tolist()
    return rows, gains_k, _cosines(bank, rows, query)


def _check_k(k: int, routable: int) -> None:
    if not 1 <= k <= routable:
        raise ValueError(f"k={k} is out of range: {routable} experts can be routed to")


def _cosines(bank: ExpertBank, rows: Sequence[int], query: np.ndarray) -> np.ndarray:
    return bank.embeddings[list(rows)].astype(np.float64) @ _query_row(bank, query)[0].astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Priors
# ----------------------------------------------------------------------------------------------


def _mixture_moments(
    mu_kd: torch.Tensor, var_kd: torch.Tensor, alpha_k: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance [D] of the mixture Σ α_k N(µ_k, σ²_k), by the law of total variance.

    Computed in float64 and returned in the bank's dtype: the between-expert term subtracts
    nearly equal numbers when experts agree, and K·D is small enough that precision is free.
    """
    # α [K] @ x [K, D] rather than (α[:, None] * x).sum(0): the same sums, ~10x faster at D = 110,592 (a
    # reduction across rows of a [K, D] tensor is strided; a vector-matrix product is one BLAS call).
    alpha_k = torch.as_tensor(alpha_k, dtype=torch.float64, device=mu_kd.device)
    mu64_kd, var64_kd = mu_kd.double(), var_kd.double()
    mu_d = alpha_k @ mu64_kd
    within_d = alpha_k @ var64_kd  # E[Var | k]: the experts' own checkpoint spread
    between_d = alpha_k @ (mu64_kd - mu_d).square_()  # Var[E | k]: their disagreement
    return mu_d.to(mu_kd.dtype), (within_d + between_d).to(var_kd.dtype)


_CHUNK = 256  # rows gathered at once: a model soup over a 10k library must not materialise [E, D] in float64

# (µ_k [K, D], σ²_k [K, D], α [K]) -> (µ* [D], σ*² [D]): how routed experts become one prior.
MergeFn = Callable[[torch.Tensor, torch.Tensor, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def merge_prior(bank: ExpertBank, rows: Sequence[int], alpha_k: np.ndarray, sims_k: np.ndarray | None,
                merge: MergeFn | None = None, predicted_gains_k: np.ndarray | None = None,
                routed_by: str = "cosine") -> SemanticPrior:
    """The prior of routed experts `rows` with weights α. Default merge: factor space (law of total variance),
    chunked over large row sets; `merge` (e.g. ΔW space) gets the K routed rows at once."""
    rows = list(rows)
    if merge is not None:
        mu_d, var_d = merge(*bank.gather(rows), alpha_k)
    elif len(rows) <= _CHUNK:
        mu_d, var_d = _mixture_moments(*bank.gather(rows), alpha_k)
    else:
        mu_d, var_d = _chunked_moments(bank, rows, alpha_k)
    trace = AggregationTrace(
        expert_ids=[bank.ids[r] for r in rows],
        descriptions=[bank.descriptions[r] for r in rows],
        similarities=[] if sims_k is None else [float(s) for s in sims_k],
        weights=[float(a) for a in alpha_k],
        predicted_gains=None if predicted_gains_k is None else [float(g) for g in predicted_gains_k],
        routed_by="predicted_gain" if predicted_gains_k is not None else routed_by,
    )
    return SemanticPrior(mu=mu_d, var=var_d, trace=trace)


def _chunked_moments(bank: ExpertBank, rows: list[int], alpha_k: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """_mixture_moments over many rows in two passes of _CHUNK rows (µ* first, then the spread around it)."""
    alpha = torch.as_tensor(alpha_k, dtype=torch.float64)
    chunks = [slice(i, i + _CHUNK) for i in range(0, len(rows), _CHUNK)]
    mu_d = within_d = between_d = 0
    for c in chunks:
        mu_kd, var_kd = bank.gather(rows[c])
        mu_d = mu_d + alpha[c] @ mu_kd.double()
        within_d = within_d + alpha[c] @ var_kd.double()
    for c in chunks:
        between_d = between_d + alpha[c] @ (bank.gather(rows[c])[0].double() - mu_d).square_()
    return mu_d.float(), (within_d + between_d).float()


def aggregate_experts(
    bank: ExpertBank,
    query: np.ndarray,
    k: int = 4,
    tau: float = 0.05,
    exclude: Collection[str] = (),
    merge: MergeFn | None = None,
) -> SemanticPrior:
    """SG-LoRA's sparse aggregator: top-k by cosine, softmax(cos/τ) weights, mixture µ*, σ*² (`merge`: how)."""
    rows, sims_k = route(bank, query, k, exclude)
    return merge_prior(bank, rows, softmax_weights(sims_k, tau), sims_k, merge)


def uniform_prior(bank: ExpertBank, indices: Sequence[int], query: np.ndarray | None = None,
                  routed_by: str = "all") -> SemanticPrior:
    """Equal weights over the given bank rows: a model soup (all rows) or AdapterSoup (the routed
    top-K). Same variance formula with α uniform. Pass `query` to record cosine similarities in the
    trace (so the coverage signal is still reported); without it they are left empty. `routed_by`: how the
    rows were chosen ("all" for a soup of the library, "cosine" for AdapterSoup's top-K)."""
    rows = [int(i) for i in indices]
    if not rows:
        raise ValueError("uniform_prior needs at least one expert index")
    if any(not 0 <= r < len(bank) for r in rows):
        raise ValueError(f"expert indices must lie in [0, {len(bank)}), got {rows}")
    sims_k = None
    if query is not None:
        sims_k = bank.embeddings[rows].astype(np.float64) @ _query_row(bank, query)[0].astype(np.float64)
    alpha_k = np.full(len(rows), 1.0 / len(rows), dtype=np.float64)
    return merge_prior(bank, rows, alpha_k, sims_k, routed_by=routed_by)
