"""Image-text retrieval with a LoRA applied per sample, and Recall@K.

Shared by the service (/retrieve) and the offline evaluation, so both rank exactly the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from app.ml.backbone import Backbone
from app.ml.lora import LoRALayout, no_lora, per_sample_lora


@torch.no_grad()
def embed_descriptions(backbone: Backbone, descriptions: Sequence[str]) -> torch.Tensor:
    """Routing queries / d_e: [N, e] normalised text embeddings by the frozen base model, never an adapter.

    An adapter left attached (a training step, a leftover trainable factor) would silently change top-K routing.
    """
    with no_lora():
        return backbone.encode_text(descriptions)


@torch.no_grad()
def embed_pairs(
    backbone: Backbone,
    layout: LoRALayout,
    adapter: torch.Tensor | None,
    images: Sequence[Image.Image] | torch.Tensor,
    texts: Sequence[str] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed images [N] and texts [T] with `adapter` ([D] flat, or None for the base model).

    The adapter travels as per-sample state (one bank row, every sample pointing at it), so the shared model is
    never modified and concurrent callers with other adapters are unaffected.
    """
    if adapter is None:
        with no_lora():
            return backbone.encode_images(images), backbone.encode_text(texts)
    bank = adapter.reshape(1, -1).to(backbone.device)
    with per_sample_lora(layout, bank, torch.zeros(len(images), dtype=torch.long)):
        image_emb = backbone.encode_images(images)
    with per_sample_lora(layout, bank, torch.zeros(len(texts), dtype=torch.long)):
        text_emb = backbone.encode_text(texts)
    return image_emb, text_emb


def rank_of_match(sim: torch.Tensor) -> torch.Tensor:
    """sim [N, N] with the match of row i at column i -> 0-based rank of each match [N].

    Ties count against the match (pessimistic): an item scoring the same as the match is ranked above it, so a
    constant similarity matrix scores R@1 = 0, never a lucky 100.
    """
    target = sim.diagonal()[:, None]  # [N, 1]
    others = ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    return ((sim >= target) & others).sum(dim=1)


def recall_at_k(sim: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """I2T and T2I Recall@K in percent for a square image×text similarity matrix with matches on the diagonal."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"recall_at_k needs a square similarity matrix, got {list(sim.shape)}")
    ranks = {"i2t": rank_of_match(sim), "t2i": rank_of_match(sim.T)}
    return {d: {k: 100.0 * (r < k).float().mean().item() for k in ks} for d, r in ranks.items()}
