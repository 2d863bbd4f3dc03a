"""Train one rank-r LoRA expert per seen task and keep the statistics SG-LoRA needs.

Per task: symmetric InfoNCE over the task's image-caption pairs, frozen backbone, LoRA from the shared
fixed-seed init. The last `keep_last` steps are the expert's checkpoints; their element-wise mean µ_e and
variance σ²_e are accumulated as training goes (Welford), never by stacking copies. The checkpoints
themselves are also written, because the CVAE is trained on them.

Each expert lands in its own safetensors file, written to a temporary name and renamed, so a re-run skips
finished experts (idempotent) and shards (`shard`, `num_shards`) never write the same file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from app.ml.backbone import Backbone
from app.ml.lora import LoRAConfig, LoRALayout, lora_parameters, lora_to_vector, reset_lora
from app.ml.retrieval import embed_descriptions
from offline.data import Pair, Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertTrainingConfig:
    steps: int = 100
    lr: float = 1e-2
    batch_size: int = 32
    keep_last: int = 20  # M: the last M steps are the expert's checkpoints
    seed: int = 0  # batch order; the LoRA init is LoRAConfig.init_seed, shared by every expert

    def __post_init__(self) -> None:
        if not 1 <= self.keep_last <= self.steps:
            raise ValueError(f"keep_last must be in [1, steps={self.steps}], got {self.keep_last}")


class RunningMoments:
    """Element-wise mean and (population) variance of a stream of [D] vectors, in O(D) memory (Welford).

    Population variance (ddof=0) is what the law of total variance in the aggregator assumes.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self._m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (x - self.mean)

    @property
    def var(self) -> torch.Tensor:
        return self._m2 / max(self.count, 1)


@dataclass
class ExpertResult:
    mu: torch.Tensor  # [D]
    var: torch.Tensor  # [D]
    checkpoints: torch.Tensor  # [M, D]
    final_loss: float


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched [N, e] normalised embeddings (CLIP's objective)."""
    logits = logit_scale * image_emb @ text_emb.T  # [N, N]
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def encode_pairs(backbone: Backbone, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocess once per task: pixels [N, 3, H, W] and tokens [N, ctx]."""
    return backbone.preprocess_images([p.image for p in pairs]), backbone.tokenize([p.caption for p in pairs])


def train_expert(
    backbone: Backbone,
    lora_config: LoRAConfig,
    pairs: Sequence[Pair],
    config: ExpertTrainingConfig,
    on_step: Callable[[float], None] | None = None,
) -> ExpertResult:
    """Fit the model's (already injected) LoRA to `pairs` from the shared init."""
    model = backbone.model
    reset_lora(model, lora_config)
    pixels, tokens = encode_pairs(backbone, pairs)
    optimiser = torch.optim.Adam(lora_parameters(model), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    logit_scale = model.logit_scale.exp().detach()
    dim = lora_to_vector(model).numel()
    moments, checkpoints = RunningMoments(dim), torch.empty(config.keep_last, dim)
    batch = min(config.batch_size, len(pairs))
    loss = torch.tensor(float("nan"))
    for step in range(config.steps):
        idx = torch.randperm(len(pairs), generator=generator)[:batch]
        loss = contrastive_loss(backbone.encode_images(pixels[idx]), backbone.encode_text(tokens[idx]), logit_scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        kept = step - (config.steps - config.keep_last)
        if kept >= 0:
            vector = lora_to_vector(model)
            moments.update(vector)
            checkpoints[kept] = vector
        if on_step is not None:
            on_step(loss.item())
    return ExpertResult(moments.mean.float(), moments.var.float(), checkpoints, float(loss.item()))


describe = embed_descriptions  # d_e: the same base-model embedding the service routes with


# ------------------------------------------------------------------------------------ expert files


def expert_path(experts_dir: Path, task_name: str) -> Path:
    return experts_dir / f"{task_name}.safetensors"


def write_expert(path: Path, task: Task, result: ExpertResult, embedding: torch.Tensor, provenance: dict) -> None:
    tensors = {"mu": result.mu, "var": result.var, "checkpoints": result.checkpoints, "embedding": embedding}
    metadata = {"name": task.name, "description": task.description, "provenance": json.dumps(provenance)}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.rename(path)  # atomic: a crash never leaves a half-written expert that a re-run would skip


def read_expert(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["provenance"] = json.loads(metadata["provenance"])
    return load_file(str(path)), metadata


def shard_of(tasks: Sequence[Task], shard: int, num_shards: int) -> list[Task]:
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return [t for i, t in enumerate(tasks) if i % num_shards == shard]


def train_experts(
    backbone: Backbone,
    layout: LoRALayout,
    lora_config: LoRAConfig,
    tasks: Sequence[Task],
    config: ExpertTrainingConfig,
    experts_dir: Path,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
) -> list[str]:
    """Train the experts of this shard that are not on disk yet; returns the names trained."""
    experts_dir.mkdir(parents=True, exist_ok=True)
    todo = [t for t in shard_of(tasks, shard, num_shards) if not expert_path(experts_dir, t.name).exists()]
    trained = []
    bar = tqdm(todo, desc=f"experts (shard {shard}/{num_shards})", disable=not progress)
    for task in bar:
        if len(task.pairs) < 2:
            logger.warning("task %s has %d pairs; contrastive training needs 2, skipped", task.name, len(task.pairs))
            continue
        result = train_expert(backbone, lora_config, task.pairs, config,
                              on_step=lambda loss, t=task: bar.set_postfix(task=t.name, loss=f"{loss:.3f}"))
        provenance = {"n_pairs": len(task.pairs), "final_loss": result.final_loss, "layout_hash": layout.hash,
                      **asdict(config)}
        embedding = describe(backbone, [task.description])[0].cpu()
        write_expert(expert_path(experts_dir, task.name), task, result, embedding, provenance)
        trained.append(task.name)
    return trained
