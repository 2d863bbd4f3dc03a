"""The transfer matrix: how much each library expert helps each seen task, measured on held-out pairs.

G[t, e] = mR@1(expert e's µ on task t's held-out pairs) − mR@1(zero-shot on them), in points. It is the data the
transfer router learns from (app/ml/transfer_router.py) and the ground truth of leave-one-task-out validation
(offline/validate.py): serving expert e for seen task t *is* measured by G[t, e].

Large libraries measure a sample of pairs: each task against its `nearest` most similar experts (by description
cosine) plus itself; the mask says which entries were measured. The work is one engine item per task
(`transfer_item`, offline/engine.py), so a Ray cluster measures it as it trains experts.

Shapes: T seen tasks (rows), E experts (columns, the library order), P held-out pairs of a task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.ml.backbone import Backbone
from app.ml.lora import LoRALayout, per_sample_lora
from app.ml.retrieval import embed_pairs, recall_at_k, same_caption_mask
from offline.data import Pair, Task
from offline.engine import LocalEngine, RayEngine
from offline.train_experts import _worker_backbone, encode_pairs, item_task, task_item, weights_on_disk

_ADAPTERS_PER_FORWARD = 8  # experts scored in one batched forward (per-sample LoRA): 8 × P images at a time


@dataclass
class HeldOut:
    """One task's held-out pairs, preprocessed once."""

    pixels: torch.Tensor  # [P, 3, H, W]
    tokens: torch.Tensor  # [P, ctx]
    positives: torch.Tensor  # [P, P] bool: same caption counts as a match

    @classmethod
    def of(cls, backbone: Backbone, pairs: Sequence[Pair]) -> HeldOut:
        pixels, tokens = encode_pairs(backbone, pairs)
        return cls(pixels, tokens, same_caption_mask([p.caption for p in pairs]))


def mean_r1(sim_pp: torch.Tensor, positives: torch.Tensor) -> float:
    """mR@1 in points: the mean of I2T and T2I Recall@1 (the evaluation's single number)."""
    recall = recall_at_k(sim_pp, (1,), positives)
    return (recall["i2t"][1] + recall["t2i"][1]) / 2


@torch.no_grad()
def score_adapters(backbone: Backbone, layout: LoRALayout, vectors_ud: torch.Tensor | None,
                   held_out: HeldOut) -> np.ndarray:
    """mR@1 [U] of each flat adapter on one task's held-out pairs (None: the zero-shot base, [1])."""
    if vectors_ud is None:
        images, texts = embed_pairs(backbone, layout, None, held_out.pixels, held_out.tokens)
        return np.array([mean_r1(images @ texts.T, held_out.positives)])
    scores, n = [], len(held_out.pixels)
    for start in range(0, len(vectors_ud), _ADAPTERS_PER_FORWARD):
        bank = vectors_ud[start : start + _ADAPTERS_PER_FORWARD].to(backbone.device)
        index = torch.arange(len(bank)).repeat_interleave(n)  # adapter u for samples [u·P, (u+1)·P)
        with per_sample_lora(layout, bank, index):
            images = backbone.encode_images(held_out.pixels.repeat(len(bank), 1, 1, 1)).view(len(bank), n, -1)
            texts = backbone.encode_text(held_out.tokens.repeat(len(bank), 1)).view(len(bank), n, -1)
        scores += [mean_r1(images[u] @ texts[u].T, held_out.positives) for u in range(len(bank))]
    return np.array(scores)


def measured_experts(task_row: int, similarities_e: np.ndarray, nearest: int | None) -> np.ndarray:
    """Which experts to score on a task: all (nearest None), or the `nearest` most similar plus the task's own."""
    if nearest is None or nearest >= len(similarities_e):
        return np.arange(len(similarities_e))
    chosen = set(np.argsort(-similarities_e, kind="stable")[:nearest].tolist()) | {task_row}
    return np.array(sorted(chosen))


def measure_task(backbone: Backbone, layout: LoRALayout, mu_ed: torch.Tensor, held_out: HeldOut,
                 experts: np.ndarray) -> tuple[float, np.ndarray]:
    """(zero-shot mR@1, gains [len(experts)]) of one task."""
    zero_shot = float(score_adapters(backbone, layout, None, held_out)[0])
    return zero_shot, score_adapters(backbone, layout, mu_ed[torch.as_tensor(experts)], held_out) - zero_shot


@dataclass
class TransferMatrix:
    task_ids: list[str]  # rows (seen tasks; each is also a library expert)
    expert_ids: list[str]  # columns, library order
    gains: np.ndarray  # [T, E] points over zero-shot; 0 where not measured
    mask: np.ndarray  # [T, E] bool, measured entries
    zero_shot: np.ndarray  # [T] zero-shot mR@1 of each task

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"gains": self.gains.astype(np.float32), "mask": self.mask.astype(np.uint8),
                "zero_shot": self.zero_shot.astype(np.float32)}


def transfer_item(shared: dict, item: dict) -> dict:
    """Engine work item: one seen task's row. shared: what `expert_shared` prepares (model, weights, LoRA,
    device) plus "mu" [E, D]; item: the task's held-out pairs (train_experts.task_item) and "experts" to score."""
    backbone, layout = _worker_backbone(shared["model_name"], weights_on_disk(shared["weights"]),
                                        json.dumps(shared["lora"], sort_keys=True), shared["device"])
    held_out = HeldOut.of(backbone, item_task(item).pairs)
    zero_shot, gains = measure_task(backbone, layout, torch.from_numpy(shared["mu"]), held_out, item["experts"])
    return {"zero_shot": zero_shot, "gains": gains}


def measure_transfer(shared: dict, expert_ids: Sequence[str], embeddings_ee: np.ndarray,
                     held_out_pairs: dict[str, Sequence[Pair]], engine: LocalEngine | RayEngine,
                     nearest: int | None = None, progress: bool = True, threads: int = 1) -> TransferMatrix:
    """G for every library expert that is also a seen task with held-out pairs (tasks = experts here), one engine
    item per task. `shared` carries the model (pipeline.expert_shared) and the experts' µ [E, D] as "mu"."""
    task_ids = [e for e in expert_ids if e in held_out_pairs]
    rows = {e: i for i, e in enumerate(expert_ids)}
    gains = np.zeros((len(task_ids), len(expert_ids)))
    mask = np.zeros_like(gains, dtype=bool)
    zero_shot = np.zeros(len(task_ids))
    experts_of = {task: measured_experts(rows[task], embeddings_ee @ embeddings_ee[rows[task]], nearest)
                  for task in task_ids}
    items = ((task, task_item(Task(task, "", list(held_out_pairs[task]))) | {"experts": experts_of[task]})
             for task in task_ids)
    for task, result in engine.map(transfer_item, items, shared=shared, total=len(task_ids), desc="transfer matrix",
                                   progress=progress, threads=threads):
        t = task_ids.index(task)
        zero_shot[t], gains[t, experts_of[task]] = result["zero_shot"], result["gains"]
        mask[t, experts_of[task]] = True
    return TransferMatrix(task_ids, list(expert_ids), gains, mask, zero_shot)
