"""One build configuration (JSON), and the `--tiny` preset that builds the demo/test store on CPU."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from app.ml.lora import LoRAConfig
from offline.data import (
    LoadReport,
    Task,
    coco_tasks,
    csv_tasks,
    folder_tasks,
    split_pairs,
    split_tasks,
    synthetic_family,
)
from offline.train_experts import ExpertTrainingConfig


@dataclass(frozen=True)
class DatasetConfig:
    kind: str = "synthetic"  # synthetic | folder | coco | csv
    path: str | None = None  # folder root, CSV file, or COCO captions JSON
    images_dir: str | None = None  # COCO only
    n_pairs: int = 80  # synthetic only: pairs per task
    seed: int = 0  # synthetic images
    n_unseen: int = 8  # tasks held out of the library: the evaluation's unseen tasks
    n_test_pairs: int = 20  # held-out pairs per task, never trained on
    split_seed: int = 0


@dataclass(frozen=True)
class CVAETrainingConfig:
    chunk_size: int = 1024
    hidden: int = 512
    cond_dim: int = 256
    latent_dim: int = 32
    pos_dim: int = 64
    kl_weight: float = 1.0  # λ
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    leave_self_out: bool = True  # condition each expert on its neighbours only: the unseen-task situation
    val_fraction: float = 0.2  # experts held out to choose the training step (early stopping); 0: keep the last
    eval_every: int = 25  # steps between validations
    seed: int = 0


@dataclass(frozen=True)
class BuildConfig:
    model_name: str = "ViT-B-16"
    pretrained: str | None = "openai"  # open_clip tag or local weights file
    pretrain_base_steps: int = 0  # > 0: pretrain the (tiny) base on the dataset first, into the store
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    experts: ExpertTrainingConfig = field(default_factory=lambda: ExpertTrainingConfig(keep_last=100, steps=500))
    k: int = 4
    tau: float = 0.05
    index_factory: str = "auto"  # faiss factory string, or "auto": exact up to a library size, IVF above
    library_dtype: str = "float32"  # expert statistics on disk: float32 | float16 (aggregation stays float32)
    transfer_nearest: int | None = None  # transfer matrix: each seen task × its N nearest experts (None: all)
    cvae: CVAETrainingConfig = field(default_factory=CVAETrainingConfig)
    # CPU threads of every build computation, whatever the machine or engine: part of what fixes a store's bytes
    # (offline/threads.py). A Ray task reserves --task-cpus; give it as many as this for full speed.
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self) | {"lora": self.lora.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown build config keys: {sorted(unknown)}")
        nested = {"dataset": DatasetConfig, "experts": ExpertTrainingConfig, "cvae": CVAETrainingConfig}
        kwargs = {k: (nested[k](**v) if k in nested else v) for k, v in d.items()}
        if "lora" in d:
            kwargs["lora"] = LoRAConfig.from_dict(LoRAConfig().to_dict() | d["lora"])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> BuildConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# The synthetic family on the tiny model: builds a complete store on 2 CPU cores in about a minute or two.
TINY = BuildConfig(
    model_name="tiny_clip",
    pretrained=None,
    pretrain_base_steps=800,
    dataset=DatasetConfig(kind="synthetic", n_pairs=140, n_unseen=8, n_test_pairs=60),
    lora=LoRAConfig(rank=2, alpha=4.0, towers=("vision", "text")),
    experts=ExpertTrainingConfig(steps=100, lr=1e-2, batch_size=32, keep_last=20),
    cvae=CVAETrainingConfig(chunk_size=256, hidden=256, cond_dim=128, latent_dim=16, pos_dim=32, steps=400,
                            batch_size=64, lr=1e-3),
)


def load_tasks(cfg: DatasetConfig, report: LoadReport | None = None) -> list[Task]:
    if cfg.kind == "synthetic":
        return synthetic_family(n_pairs=cfg.n_pairs, seed=cfg.seed)
    if cfg.path is None:
        raise ValueError(f"dataset kind {cfg.kind!r} needs a path")
    if cfg.kind == "folder":
        return folder_tasks(Path(cfg.path), report)
    if cfg.kind == "csv":
        return csv_tasks(Path(cfg.path), report)
    if cfg.kind == "coco":
        return coco_tasks(Path(cfg.path), Path(cfg.images_dir or Path(cfg.path).parent), report)
    raise ValueError(f"unknown dataset kind {cfg.kind!r}: use synthetic, folder, coco or csv")


@dataclass
class TaskSplit:
    seen: list[Task]  # library tasks, training pairs only
    unseen: list[Task]  # evaluation tasks, training pairs only (for the oracle)
    test_pairs: dict[str, list]  # task name -> held-out pairs, for every task


def split_dataset(tasks: list[Task], cfg: DatasetConfig) -> TaskSplit:
    """Seeded seen/unseen split of tasks, and train/test split of each task's pairs."""
    seen, unseen = split_tasks(tasks, cfg.n_unseen, cfg.split_seed)
    test_pairs, trimmed = {}, {}
    for task in tasks:
        train, test = split_pairs(task, cfg.n_test_pairs, cfg.split_seed)
        test_pairs[task.name] = test
        trimmed[task.name] = Task(task.name, task.description, train, task.phrasings)
    return TaskSplit([trimmed[t.name] for t in seen], [trimmed[t.name] for t in unseen], test_pairs)
