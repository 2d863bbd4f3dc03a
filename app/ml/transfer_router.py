"""A router that predicts how much an expert helps a task, learned offline from a transfer matrix.

Cosine similarity of description embeddings is SG-LoRA's router, but text similarity does not predict transfer:
on the synthetic family a whole same-colour expert helps and a same-shape one hurts, while the frozen text tower
ranks shape about as high as colour. So, offline, every expert e is scored on seen task t's held-out pairs, and
its *gain* G[t, e] = mR@1(e on t) − mR@1(zero-shot on t) is recorded (offline/transfer.py). This module learns
from those gains a function of description embeddings only — no parsing of templated words, users write free
text — that predicts the gain of each library expert for a new description.

Features first: φ(d) = normalise(W (d − m)), m the mean and W = Σ_s^{-1/2} the inverse square root of the
(shrunk) covariance of the seen tasks' embeddings. Description embeddings of one family share a large common
direction (pairwise cosines 0.89–0.97 on the synthetic family), which swamps what distinguishes them; centring
and whitening make the directions that vary (colour, shape) count. Shrinkage s ∈ (0, 1] blends the covariance
with its average eigenvalue (s = 1: centring only), so 40 tasks in 32 dimensions still give a stable W.

Model: kernel ridge regression on (task, expert) pairs with a product kernel
    k((t, e), (t', e')) = κ(φ_t, φ_t') · κ(φ_e, φ_e'),    κ(a, b) = exp((a·b − 1) / h)   (unit vectors)
i.e. a learned similarity in an RKHS of the features (with a linear κ, h = 0, it is exactly a bilinear metric
φ_tᵀ M φ_e with M fitted by ridge: what generalises compositionally to a new colour-shape combination).
The dual coefficients β [T, E] live on the observed grid, so prediction for a
new description d* and any expert with embedding d_e (also one imported after fitting) is
    ĝ(e | d*) = b + κ(d*, D_T)ᵀ β κ(D_E, d_e),
b the mean observed gain. The model is an inner product in at most T dimensions: with β = U S Vᵀ (thin SVD, rank
r ≤ T), ĝ(e | d*) = b + u(d*) · z_e, u(d*) = S Uᵀ κ(D_T, d*) and z_e = Vᵀ κ(D_E, d_e) (for the linear kernel
z_e = (D_Eᵀ V)ᵀ φ_e: r numbers per expert, computed once). So the top experts of a description are a maximum-
inner-product search over the z_e (app/ml/gain_index.py), whatever the size of the library.

Observed pairs may be a subset of the grid (large libraries measure each expert on its nearest tasks only);
the masked system (P(K_T ⊗ K_E)Pᵀ + λI) β = y − b is solved by conjugate gradients with Kronecker mat-vecs,
never forming the [TE, TE] kernel.

Pure numpy: the service and offline/ both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

_RANK_TOL = 1e-12  # singular values of β below this fraction of the largest add nothing a float64 sum can hold
_CHUNK = 4096  # experts embedded at once: bounds the [chunk, E_fit] kernel block of a bandwidth > 0 router


def kernel(a_ne: np.ndarray, b_me: np.ndarray, bandwidth: float) -> np.ndarray:
    """κ between unit-vector rows [N, e] and [M, e] -> [N, M]; bandwidth 0 means linear (plain cosine)."""
    cos_nm = np.asarray(a_ne, np.float64) @ np.asarray(b_me, np.float64).T
    return cos_nm if bandwidth == 0 else np.exp((cos_nm - 1.0) / bandwidth)


def _solve_masked_kronecker(K_tt: np.ndarray, K_ee: np.ndarray, y_te: np.ndarray, mask_te: np.ndarray,
                            ridge: float, max_iter: int = 1000, tol: float = 1e-24) -> np.ndarray:
    """β [T, E] (zero off the mask) solving (P(K_T ⊗ K_E)Pᵀ + λI) β = y on the observed entries, by CG.

    `tol` bounds the squared residual relative to the squared right-hand side (1e-24: ~1e-12 in norm)."""
    if mask_te.all():  # the full grid: exact in closed form, (K_T ⊗ K_E + λI)⁻¹ through both eigendecompositions
        return _solve_full_kronecker(K_tt, K_ee, y_te, ridge)

    def apply(v_te: np.ndarray) -> np.ndarray:
        return mask_te * (K_tt @ v_te @ K_ee) + ridge * v_te

    beta = np.zeros_like(y_te)
    residual = mask_te * y_te
    direction = residual.copy()
    rs = float((residual * residual).sum())
    target = tol * max(rs, 1e-300)
    for _ in range(max_iter):
        if rs <= target:
            break
        a_dir = apply(direction)
        step = rs / float((direction * a_dir).sum())
        beta += step * direction
        residual -= step * a_dir
        rs_new = float((residual * residual).sum())
        direction = residual + (rs_new / rs) * direction
        rs = rs_new
    return beta


def _solve_full_kronecker(K_tt: np.ndarray, K_ee: np.ndarray, y_te: np.ndarray, ridge: float) -> np.ndarray:
    """β = (K_T ⊗ K_E + λI)⁻¹ y with every pair observed: K = U Λ Uᵀ on both sides, so the inverse is diagonal in
    the product eigenbasis (routers fitted on many phrasings per task make CG's mat-vecs the bottleneck)."""
    lt, ut = np.linalg.eigh(K_tt)
    le, ue = np.linalg.eigh(K_ee)
    spectrum = np.clip(lt, 0, None)[:, None] * np.clip(le, 0, None)[None, :] + ridge
    return ut @ ((ut.T @ y_te @ ue) / spectrum) @ ue.T


def whitener(embeddings_ne: np.ndarray, shrinkage: float,
             groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean m [e], W [e, e]) of φ: W = Σ_s^{-1/2}, Σ_s = (1 − s)·Σ + s·mean-eigenvalue·I.

    `groups` [N] (rows that are phrasings of one task share a label): Σ is then the *within*-task covariance —
    how wording moves an embedding when the task stays — so W scales wording directions down and the directions
    that tell tasks apart up (within-class whitening, as in speaker verification)."""
    x = np.asarray(embeddings_ne, np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    if groups is not None:
        _, group_of = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.zeros((group_of.max() + 1, x.shape[1]))
        np.add.at(sums, group_of, x)
        centred = x - (sums / np.bincount(group_of)[:, None])[group_of]
    cov = centred.T @ centred / len(x)
    cov = (1 - shrinkage) * cov + shrinkage * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
    eigval, eigvec = np.linalg.eigh(cov)
    return mean, eigvec @ np.diag(np.clip(eigval, 1e-12, None) ** -0.5) @ eigvec.T


def features(embeddings_ne: np.ndarray, mean: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """φ(d) = normalise(W (d − m)), rows [N, e]."""
    f = (np.asarray(embeddings_ne, np.float64).reshape(-1, len(mean)) - mean) @ whiten.T
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@dataclass(eq=False)
class TransferRouter:
    """Predicted gains of library experts for a description embedding. Fitted by `fit_transfer_router`."""

    task_features: np.ndarray  # [T, e] φ of the seen tasks' description embeddings (rows of the gain grid)
    expert_features: np.ndarray  # [E, e] φ of the experts' description embeddings when fitted (columns)
    dual_coef: np.ndarray  # [T, E] β
    feature_mean: np.ndarray  # [e] m
    feature_whiten: np.ndarray  # [e, e] W
    bias: float  # b: mean observed gain (mR@1 points)
    bandwidth: float  # h of κ (0: linear)
    ridge: float  # λ
    shrinkage: float  # s of the whitening

    def predict(self, query_e: np.ndarray, expert_embeddings_ne: np.ndarray) -> np.ndarray:
        """Predicted gain [N] (mR@1 points over zero-shot) of each expert in `expert_embeddings_ne` [N, e]."""
        query_f = features(query_e, self.feature_mean, self.feature_whiten)
        experts_f = features(expert_embeddings_ne, self.feature_mean, self.feature_whiten)
        k_t = kernel(query_f, self.task_features, self.bandwidth)[0]  # [T]
        k_en = kernel(self.expert_features, experts_f, self.bandwidth)  # [E, N]
        return self.bias + (k_t @ self.dual_coef) @ k_en

    @cached_property
    def _factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(U S [T, r], V [E_fit, r]) of β = U S Vᵀ, keeping the r singular values that are not round-off."""
        u, s, vt = np.linalg.svd(self.dual_coef, full_matrices=False)
        r = max(1, int(np.sum(s > _RANK_TOL * (s[0] if s.size else 0.0))))
        return u[:, :r] * s[:r], vt[:r].T

    @cached_property
    def _linear_expert_map(self) -> np.ndarray:
        """[e, r] D_Eᵀ V: with the linear kernel, z_e = φ_e @ this."""
        return self.expert_features.T @ self._factors[1]

    def query_embedding(self, query_e: np.ndarray) -> np.ndarray:
        """u(d*) [r]: predict(d*, d_e) = bias + expert_embeddings(d_e) @ u(d*)."""
        query_f = features(query_e, self.feature_mean, self.feature_whiten)
        return kernel(query_f, self.task_features, self.bandwidth)[0] @ self._factors[0]

    def expert_embeddings(self, expert_embeddings_ne: np.ndarray) -> np.ndarray:
        """z_e [N, r] of experts with description embeddings [N, e]: computed once per library, not per request."""
        experts_f = features(expert_embeddings_ne, self.feature_mean, self.feature_whiten)
        if self.bandwidth == 0:
            return experts_f @ self._linear_expert_map
        v = self._factors[1]
        return np.concatenate([kernel(experts_f[i:i + _CHUNK], self.expert_features, self.bandwidth) @ v
                               for i in range(0, len(experts_f), _CHUNK)])

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"task_features": self.task_features, "expert_features": self.expert_features,
                "dual_coef": self.dual_coef, "feature_mean": self.feature_mean, "feature_whiten": self.feature_whiten}

    def params(self) -> dict:
        return {"bias": self.bias, "bandwidth": self.bandwidth, "ridge": self.ridge, "shrinkage": self.shrinkage}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], params: dict) -> TransferRouter:
        t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        return cls(t["task_features"], t["expert_features"], t["dual_coef"], t["feature_mean"], t["feature_whiten"],
                   float(params["bias"]), float(params["bandwidth"]), float(params["ridge"]),
                   float(params["shrinkage"]))


def fit_transfer_router(task_embeddings: np.ndarray, expert_embeddings: np.ndarray, gains_te: np.ndarray,
                        mask_te: np.ndarray | None = None, bandwidth: float = 0.0, ridge: float = 0.1,
                        shrinkage: float = 1.0, groups: np.ndarray | None = None) -> TransferRouter:
    """Kernel ridge on the observed gains G[t, e] (mask: which pairs were measured; default all).

    Rows t may be several phrasings of one task (same gains, `groups` labels them): the router then learns that
    wording does not change which expert helps, and `groups` whitens by the within-task covariance."""
    gains_te = np.asarray(gains_te, dtype=np.float64)
    mask_te = np.ones_like(gains_te) if mask_te is None else np.asarray(mask_te, dtype=np.float64)
    if gains_te.shape != (len(task_embeddings), len(expert_embeddings)) or mask_te.shape != gains_te.shape:
        raise ValueError(f"gains must be [T={len(task_embeddings)}, E={len(expert_embeddings)}] like the mask, "
                         f"got {gains_te.shape} and {mask_te.shape}")
    if not mask_te.any():
        raise ValueError("no observed (task, expert) gains to fit a router on")
    if ridge <= 0 or bandwidth < 0 or not 0 < shrinkage <= 1:
        raise ValueError(f"need ridge > 0, bandwidth >= 0 and 0 < shrinkage <= 1; "
                         f"got {ridge}, {bandwidth}, {shrinkage}")
    bias = float((gains_te * mask_te).sum() / mask_te.sum())
    mean, whiten = whitener(task_embeddings, shrinkage, groups)
    task_f, expert_f = features(task_embeddings, mean, whiten), features(expert_embeddings, mean, whiten)
    K_tt, K_ee = kernel(task_f, task_f, bandwidth), kernel(expert_f, expert_f, bandwidth)
    beta = _solve_masked_kronecker(K_tt, K_ee, np.where(mask_te > 0, gains_te - bias, 0.0), mask_te, ridge)
    return TransferRouter(task_f, expert_f, beta, mean, whiten, bias, float(bandwidth), float(ridge), float(shrinkage))
