"""Image-text retrieval with a LoRA applied per sample, and Recall@K.

Shared by the service (/retrieve) and the offline evaluation, so both rank exactly the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


@torch.no_grad()
def embed_mixed(backbone: Backbone, layout: LoRALayout, tower: str, inputs: Sequence[str] | torch.Tensor,
                bank: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """One forward over a batch that mixes adapters: sample n uses bank[index[n]] (bank [U, D]; a zero row is
    the base model exactly, its LoRA term adding 0), or the base model for every sample when bank is None.

    tower "text": inputs are N strings (or [N, ctx] tokens); "image": [N, 3, H, W] preprocessed pixels.
    -> [N, embed_dim] float32, L2-normalised. Used to micro-batch requests that arrive together.
    """
    encode = backbone.encode_text if tower == "text" else backbone.encode_images
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.to(backbone.device)
    if bank is None:
        with no_lora():
            return encode(inputs)
    with per_sample_lora(layout, bank.to(backbone.device), index):
        return encode(inputs)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched [N, e] normalised embeddings (CLIP's objective): what experts are
    trained on offline and what few-shot refinement fits on a request's examples."""
    logits = logit_scale * image_emb @ text_emb.T  # [N, N]
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def same_caption_mask(captions: Sequence[str]) -> torch.Tensor:
    """[N, N] bool: pair i's image and pair j's caption are a correct match when the captions are identical.

    Held-out sets of a task often repeat a caption (the synthetic family has 40 distinct captions per task): an
    image matched to another copy of its own caption is right, and counting it wrong would cap R@1 far below 100.
    """
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    return ids[:, None] == ids[None, :]


def rank_of_match(sim: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of the best-scoring correct item of each row of sim [N, T] -> [N].

    `positives` [N, T] marks the correct items (default: the diagonal, one match per row). Ties count against
    the match (pessimistic): a wrong item scoring the same as the best correct one is ranked above it, so a
    constant similarity matrix scores R@1 = 0, never a lucky 100.
    """
    if positives is None:
        positives = torch.eye(sim.shape[0], sim.shape[1], dtype=torch.bool, device=sim.device)
    best = sim.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # [N, 1]
    return ((sim >= best) & ~positives).sum(dim=1)


def recall_at_k(sim: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                positives: torch.Tensor | None = None) -> dict[str, dict[int, float]]:
    """I2T and T2I Recall@K in percent for a square image×text similarity matrix.

    Matches are on the diagonal, plus wherever `positives` [N, N] (e.g. `same_caption_mask`) says so.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"recall_at_k needs a square similarity matrix, got {list(sim.shape)}")
    if positives is not None:
        if positives.shape != sim.shape:
            raise ValueError(f"positives must match sim's shape {list(sim.shape)}, got {list(positives.shape)}")
        positives = positives.to(sim.device) | torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    ranks = {"i2t": rank_of_match(sim, positives),
             "t2i": rank_of_match(sim.T, None if positives is None else positives.T)}
    return {d: {k: 100.0 * (r < k).float().mean().item() for k in ks} for d, r in ranks.items()}
