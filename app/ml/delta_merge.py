"""Merging experts in ΔW space: Σ_k α_k·s·B_k A_k per projection, re-factorised to rank r by truncated SVD.

Why not average the factors (µ* = Σ α_k µ_k)? Experts start from one shared A, but A moves far from it during
training and different experts' updates are nearly orthogonal (cosine ≈ 0.05 on the synthetic library), so
B̄·Ā is not the average of the B_k A_k: the factor-space merge shrinks ‖ΔW‖ from ≈ 9.3 to ≈ 4 and mixes terms
that belong to no expert. Merging the updates themselves keeps each expert's ΔW intact; the truncated SVD
then keeps the merge's best rank-r approximation (exact when the merge already has rank ≤ r, e.g. one expert).

The merge has rank ≤ K·r, so it is factorised through QR of the stacked factors and an SVD of a [Kr, Kr] core:
O(d·(Kr)²) per projection instead of an SVD of a d×d matrix (ViT-B/16: 36 projections of 768×768 per request).

Variance, consistently: each expert is re-expressed in the merged factors' gauge — B_k' = ΔW_k·A*⁺/s and
A_k' = B*⁺·ΔW_k/s, the least-squares factors of ΔW_k given the other merged factor — whose α-weighted means are
exactly B* and A*. σ*² is then the law of total variance over those projections (between-expert term) plus
the experts' own checkpoint variance (within term, in their own gauge: the best available estimate).

Shapes: K experts, D flat layout length, per block 3 projections of width d, rank r.
"""

from __future__ import annotations

import numpy as np
import torch

from app.ml.lora import LoRALayout, vectors_to_factors


def delta_weights(layout: LoRALayout, vectors_kd: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """{block path: ΔW [K, 3, d, d] = s·B A} for flat adapters [K, D]."""
    return {path: scale * B @ A for path, (A, B) in vectors_to_factors(layout, vectors_kd).items()}


def _factor_block(A_kprd: torch.Tensor, B_kpdr: torch.Tensor, alpha_k: torch.Tensor, scale: float, rank: int):
    """Rank-r factors (A* [3, r, d], B* [3, d, r]) of Σ_k α_k·s·B_k A_k, and the singular values [3, Kr]."""
    k, p, r, d = A_kprd.shape
    # Σ_k α_k s B_k A_k = B_cat A_cat with B_cat = [α_k s B_k]_k [3, d, Kr] and A_cat = [A_k]_k [3, Kr, d].
    B_cat = (alpha_k.view(k, 1, 1, 1) * scale * B_kpdr).permute(1, 2, 0, 3).reshape(p, d, k * r)
    A_cat = A_kprd.permute(1, 0, 2, 3).reshape(p, k * r, d)
    Q_b, R_b = torch.linalg.qr(B_cat)  # [3, d, Kr], [3, Kr, Kr]
    Q_a, R_a = torch.linalg.qr(A_cat.transpose(1, 2))  # [3, d, Kr], [3, Kr, Kr]
    U, S, Vh = torch.linalg.svd(R_b @ R_a.transpose(1, 2))  # core [3, Kr, Kr]
    keep = min(rank, k * r)
    root_s = (S[:, :keep] / scale).sqrt()  # split √(S/s) to each side so that s·B*A* = U S Vᵀ
    B_star = (Q_b @ U[:, :, :keep]) * root_s[:, None, :]
    A_star = root_s[:, :, None] * (Vh[:, :keep, :] @ Q_a.transpose(1, 2))
    if keep < rank:  # fewer directions than the served rank: pad with zeros (they add nothing to ΔW)
        B_star = torch.cat([B_star, B_star.new_zeros(p, d, rank - keep)], dim=2)
        A_star = torch.cat([A_star, A_star.new_zeros(p, rank - keep, d)], dim=1)
    return A_star, B_star


def _projections(A_kprd, B_kpdr, A_star, B_star, scale: float):
    """Each expert's factors in the merged gauge: (A_k' [K, 3, r, d], B_k' [K, 3, d, r])."""
    dW_kpdd = scale * B_kpdr @ A_kprd
    A_pinv = torch.linalg.pinv(A_star)  # [3, d, r]; pinv: a zero direction (rank < r) projects to zero
    B_pinv = torch.linalg.pinv(B_star)  # [3, r, d]
    return (B_pinv @ dW_kpdd) / scale, (dW_kpdd @ A_pinv) / scale


def merge_delta_mean(layout: LoRALayout, scale: float, mu_kd: torch.Tensor, alpha_k) -> torch.Tensor:
    """µ* [D] alone: the rank-r factors of Σ α_k ΔW_k (α may be negative: few-shot weights), no variance.

    float64 inside, returned in mu_kd's dtype; α_k a sequence, numpy array or tensor [K]."""
    mu64_kd = mu_kd.double()
    alpha64_k = torch.as_tensor(np.asarray(alpha_k, dtype=np.float64), device=mu_kd.device)
    blocks = []
    for A_k, B_k in vectors_to_factors(layout, mu64_kd).values():
        A_star, B_star = _factor_block(A_k, B_k, alpha64_k, scale, layout.rank)
        p = A_star.shape[0]
        blocks.append(torch.cat([B_star.reshape(p, -1), A_star.reshape(p, -1)], dim=1).reshape(-1))
    return torch.cat(blocks).to(mu_kd.dtype)


def merge_delta_space(layout: LoRALayout, scale: float, mu_kd: torch.Tensor, var_kd: torch.Tensor,
                      alpha_k: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """µ* [D]: the rank-r factors of Σ α_k ΔW_k; σ*² [D]: mixture variance of the experts in µ*'s gauge.

    Computed in float64 (the QR/SVD of nearly dependent factors loses digits in float32); returned in the
    bank's dtype.
    """
    dtype = mu_kd.dtype
    mu64_kd, var64_kd = mu_kd.double(), var_kd.double()
    alpha64_k = torch.as_tensor(np.asarray(alpha_k, dtype=np.float64), device=mu_kd.device)
    mu_d = torch.empty(layout.D, dtype=torch.float64, device=mu_kd.device)
    between_d = torch.empty_like(mu_d)
    offset = 0
    for A_k, B_k in vectors_to_factors(layout, mu64_kd).values():
        _, p, r, d = A_k.shape
        A_star, B_star = _factor_block(A_k, B_k, alpha64_k, scale, layout.rank)
        A_proj, B_proj = _projections(A_k, B_k, A_star, B_star, scale)
        a = alpha64_k.view(-1, 1, 1, 1)
        var_A = (a * (A_proj - A_star).square()).sum(0)  # [3, r, d]
        var_B = (a * (B_proj - B_star).square()).sum(0)  # [3, d, r]
        # Flat layout per projection: B [d, r] then A [r, d] (lora.vectors_to_factors' inverse).
        n = 2 * d * r
        block_mu = torch.cat([B_star.reshape(p, -1), A_star.reshape(p, -1)], dim=1).reshape(-1)
        block_var = torch.cat([var_B.reshape(p, -1), var_A.reshape(p, -1)], dim=1).reshape(-1)
        mu_d[offset : offset + p * n] = block_mu
        between_d[offset : offset + p * n] = block_var
        offset += p * n
    within_d = (alpha64_k[:, None] * var64_kd).sum(0)
    return mu_d.to(dtype), (within_d + between_d).to(var_kd.dtype)
