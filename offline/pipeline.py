"""The offline job: (pretrain tiny base) → train experts → build library → train CVAE, each step re-runnable.

Paths: the store goes to `out`; intermediate artifacts (expert checkpoints, the pretrained tiny base) to
`<out>.work/`, so the store stays what the server loads and nothing else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from app.ml.backbone import Backbone, load_backbone
from app.ml.lora import LoRALayout, inject_lora
from app.ml.store import BASE_WEIGHTS_FILE, load_store
from offline.build_library import build_library
from offline.config import BuildConfig, TaskSplit, load_tasks, split_dataset
from offline.data import LoadReport
from offline.pretrain_base import pretrain_base
from offline.train_cvae import train_cvae
from offline.train_experts import train_experts

logger = logging.getLogger(__name__)


@dataclass
class BuildContext:
    config: BuildConfig
    out: Path
    split: TaskSplit

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".work")

    @property
    def experts_dir(self) -> Path:
        return self.work / "experts"

    @property
    def base_weights(self) -> Path | None:
        return self.work / BASE_WEIGHTS_FILE if self.config.pretrain_base_steps > 0 else None

    def pretrained(self) -> str | None:
        base = self.base_weights
        return str(base) if base is not None else self.config.pretrained

    def base_model_record(self, backbone: Backbone) -> dict:
        pretrained = BASE_WEIGHTS_FILE if self.base_weights is not None else self.config.pretrained
        return {"name": self.config.model_name, "pretrained": pretrained, "weights_id": backbone.weights_id}


def make_context(config: BuildConfig, out: Path) -> BuildContext:
    report = LoadReport()
    tasks = load_tasks(config.dataset, report)
    if report.skipped:
        logger.warning("skipped %d unreadable images (first: %s)", len(report.skipped), report.skipped[0])
    return BuildContext(config, Path(out), split_dataset(tasks, config.dataset))


def ensure_base(ctx: BuildContext, progress: bool = True) -> None:
    base = ctx.base_weights
    if base is not None and not base.exists():
        pairs = [p for t in ctx.split.seen + ctx.split.unseen for p in t.pairs]
        pretrain_base(ctx.config.model_name, pairs, base, steps=ctx.config.pretrain_base_steps, progress=progress)


def adapted_backbone(ctx: BuildContext, device: str = "cpu") -> tuple[Backbone, LoRALayout]:
    backbone = load_backbone(ctx.config.model_name, ctx.pretrained(), device)
    return backbone, inject_lora(backbone.model, ctx.config.lora)


def step_train_experts(ctx: BuildContext, shard: int = 0, num_shards: int = 1, progress: bool = True) -> list[str]:
    ensure_base(ctx, progress)
    backbone, layout = adapted_backbone(ctx)
    return train_experts(backbone, layout, ctx.config.lora, ctx.split.seen, ctx.config.experts, ctx.experts_dir,
                         shard=shard, num_shards=num_shards, progress=progress)


def step_build_library(ctx: BuildContext, cvae=None) -> str:
    backbone, layout = adapted_backbone(ctx)
    return build_library(ctx.out, ctx.experts_dir, ctx.split.seen, base_model=ctx.base_model_record(backbone),
                         lora_config=ctx.config.lora, layout=layout, index_factory=ctx.config.index_factory,
                         cvae=cvae, base_weights_file=ctx.base_weights)


def step_train_cvae(ctx: BuildContext, progress: bool = True) -> str:
    store = load_store(ctx.out)
    cvae = train_cvae(store, ctx.experts_dir, ctx.config.cvae, ctx.config.k, ctx.config.tau, progress=progress)
    return step_build_library(ctx, cvae=cvae)


def build(config: BuildConfig, out: Path, progress: bool = True) -> dict:
    """The whole offline job; returns timings and what was done."""
    ctx = make_context(config, out)
    timings, t0 = {}, time.perf_counter()
    trained = step_train_experts(ctx, progress=progress)
    timings["experts_s"] = time.perf_counter() - t0
    step_build_library(ctx)
    timings["library_s"] = time.perf_counter() - t0 - timings["experts_s"]
    t1 = time.perf_counter()
    version = step_train_cvae(ctx, progress=progress)
    timings["cvae_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    return {"version": version, "experts_trained": trained, "timings": timings}
