"""Train one rank-r LoRA expert per seen task and keep the statistics SG-LoRA needs.

Per task: symmetric InfoNCE over the task's image-caption pairs, frozen backbone, LoRA from the shared
fixed-seed init. The last `keep_last` steps are the expert's checkpoints; their element-wise mean µ_e and
variance σ²_e are accumulated as training goes (Welford), never by stacking copies. The checkpoints
themselves are also written, because the CVAE is trained on them.

Each expert lands in its own safetensors file, written to a temporary name and renamed, so a re-run skips
finished experts (idempotent) and shards (`shard`, `num_shards`) never write the same file.

`train_experts` trains in this process on a given backbone; `train_expert_item` is the same training as one
engine work item (offline/engine.py: local or one Ray task per expert), on plain data: the task's images as
uint8 arrays and its captions in, the expert file's tensors (numpy) and metadata out, which the caller writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from app.ml.backbone import Backbone, load_backbone
from app.ml.canonical import canonical_safetensors
from app.ml.lora import LoRAConfig, LoRALayout, inject_lora, lora_parameters, lora_to_vector, reset_lora
from app.ml.retrieval import contrastive_loss, embed_descriptions
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


@dataclass
class ExpertRecord:
    """What an expert file holds: tensors mu/var [D], checkpoints [M, D], embedding [e], and its metadata."""

    name: str
    description: str
    tensors: dict[str, torch.Tensor]
    provenance: dict


def expert_record(backbone: Backbone, layout: LoRALayout, lora_config: LoRAConfig, task: Task,
                  config: ExpertTrainingConfig, on_step: Callable[[float], None] | None = None) -> ExpertRecord:
    """Train one expert on the model's injected LoRA and describe it: the single recipe both engines run."""
    result = train_expert(backbone, lora_config, task.pairs, config, on_step=on_step)
    provenance = {"n_pairs": len(task.pairs), "final_loss": result.final_loss, "layout_hash": layout.hash,
                  **asdict(config)}
    embedding = describe(backbone, [task.description])[0].cpu()
    tensors = {"mu": result.mu, "var": result.var, "checkpoints": result.checkpoints, "embedding": embedding}
    return ExpertRecord(task.name, task.description, tensors, provenance)


def write_expert(path: Path, record: ExpertRecord) -> None:
    metadata = {"name": record.name, "description": record.description, "provenance": json.dumps(record.provenance)}
    tmp = path.with_suffix(".tmp")
    # Canonical bytes: the same expert is the same file, whichever process or engine trained it.
    tmp.write_bytes(canonical_safetensors({k: v.contiguous() for k, v in record.tensors.items()}, metadata))
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


def pending_tasks(tasks: Sequence[Task], experts_dir: Path, shard: int = 0, num_shards: int = 1) -> list[Task]:
    """This shard's tasks without an expert file yet (a re-run trains nothing twice), trainable ones only."""
    todo = []
    for task in shard_of(tasks, shard, num_shards):
        if expert_path(experts_dir, task.name).exists():
            continue
        if len(task.pairs) < 2:
            logger.warning("task %s has %d pairs; contrastive training needs 2, skipped", task.name, len(task.pairs))
            continue
        todo.append(task)
    return todo


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
    """Train, in this process, the experts of this shard that are not on disk yet; returns the names trained."""
    experts_dir.mkdir(parents=True, exist_ok=True)
    trained = []
    bar = tqdm(pending_tasks(tasks, experts_dir, shard, num_shards), desc=f"experts (shard {shard}/{num_shards})",
               disable=not progress)
    for task in bar:
        record = expert_record(backbone, layout, lora_config, task, config,
                               on_step=lambda loss, t=task: bar.set_postfix(task=t.name, loss=f"{loss:.3f}"))
        write_expert(expert_path(experts_dir, task.name), record)
        trained.append(task.name)
    return trained


# ------------------------------------------------------------------------------ one expert as a work item
# Plain data in and out, so a Ray task can run it on any node: no PIL objects, no torch modules, no paths that
# only the driver's filesystem has (base weights travel as bytes when the caller hands them so).


def task_item(task: Task) -> dict:
    """A task as a work item: name, description, captions and images as uint8 [H, W, 3] arrays (lossless)."""
    return {"name": task.name, "description": task.description, "captions": [p.caption for p in task.pairs],
            "images": [np.asarray(p.image.convert("RGB")) for p in task.pairs]}


def item_task(item: dict) -> Task:
    pairs = [Pair(Image.fromarray(img), cap) for img, cap in zip(item["images"], item["captions"], strict=True)]
    return Task(item["name"], item["description"], pairs)


def weights_on_disk(weights: dict | None) -> str | None:
    """The `pretrained` argument for load_backbone from the shared weights spec: a tag (or None) as is, a file's
    path when this machine has it, else its bytes written once per process to a content-named temp file."""
    if weights is None or "data" not in weights:
        return None if weights is None else weights["pretrained"]
    digest = hashlib.sha256(weights["data"]).hexdigest()
    path = Path(tempfile.gettempdir()) / f"sglora-weights-{digest[:16]}{weights['suffix']}"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(weights["data"])
        tmp.rename(path)
    return str(path)


@functools.lru_cache(maxsize=1)
def _worker_backbone(model_name: str, pretrained: str | None, lora_json: str, device: str):
    """One adapted backbone per worker process, reused by every expert it trains (loading is the slow part)."""
    backbone = load_backbone(model_name, pretrained, device)
    return backbone, inject_lora(backbone.model, LoRAConfig.from_dict(json.loads(lora_json)))


def train_expert_item(shared: dict, item: dict) -> dict:
    """Engine work item. shared: model_name, weights (see weights_on_disk), lora (LoRAConfig dict), experts
    (ExpertTrainingConfig dict), device. Returns {"tensors": {name: ndarray}, "description", "provenance"}."""
    lora = LoRAConfig.from_dict(shared["lora"])
    backbone, layout = _worker_backbone(shared["model_name"], weights_on_disk(shared["weights"]),
                                        json.dumps(shared["lora"], sort_keys=True), shared["device"])
    record = expert_record(backbone, layout, lora, item_task(item), ExpertTrainingConfig(**shared["experts"]))
    return {"tensors": {k: v.numpy() for k, v in record.tensors.items()}, "description": record.description,
            "provenance": record.provenance}


def release_worker_state() -> None:
    _worker_backbone.cache_clear()


def record_from_result(name: str, result: dict) -> ExpertRecord:
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in result["tensors"].items()}  # copy: Ray's are read-only
    return ExpertRecord(name, result["description"], tensors, result["provenance"])
