"""The offline job: (pretrain tiny base) → train experts → build library → validate → train CVAE, each re-runnable.

validate: the transfer matrix (every expert on every seen task's held-out pairs), the transfer router, and every
choice (K, τ, router, gate, default strategy) by leave-one-task-out retrieval (offline/validate.py). The CVAE is
then conditioned on the best merge's prior and its training step chosen by the same criterion.

Paths: the store goes to `out`; intermediate artifacts (expert checkpoints, the pretrained tiny base) to
`<out>.work/`, so the store stays what the server loads and nothing else.

Experts are trained through an engine (offline/engine.py): `local` (default, in this process) or `ray` (one task
per expert). Either way the preparation is done once here (base weights pretrained/loaded, the dataset loaded
and split) and handed to the work items, and each finished expert is written here as it arrives, into the same
files, so both engines produce the same store and a re-run (or a run after a crash) trains only what is missing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from app.ml.backbone import Backbone, load_backbone
from app.ml.lora import LoRALayout, inject_lora
from app.ml.routing import StoreRouting
from app.ml.store import (
    BASE_WEIGHTS_FILE,
    ROUTING_ARTIFACT,
    Store,
    TrainedCVAE,
    load_store,
    routing_artifact,
    routing_tensors,
)
from offline.build_library import build_library
from offline.config import BuildConfig, TaskSplit, load_tasks, split_dataset
from offline.data import LoadReport, synthetic_family
from offline.engine import LocalEngine, RayEngine
from offline.phrasing import build_out_of_domain
from offline.pretrain_base import pretrain_base
from offline.threads import build_environment, with_config_threads
from offline.train_cvae import train_cvae
from offline.train_experts import (
    describe,
    expert_path,
    pending_tasks,
    record_from_result,
    release_worker_state,
    task_item,
    train_expert_item,
    write_expert,
)
from offline.transfer import HeldOut, TransferMatrix, measure_transfer
from offline.validate import LOTO, score_cvae, validate, with_cvae_rows

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


# The tiny base's "web" corpus for synthetic data: other images of every colour-shape combination than the tasks'
# own (a distinct image seed), so no task's held-out image is ever pretrained on, whatever the split.
PRETRAIN_IMAGE_SEED_OFFSET = 1000


def pretraining_pairs(ctx: BuildContext) -> list:
    """What the tiny base is pretrained on: for the synthetic family a corpus of its own, independent of the split
    (so every evaluation seed can share one base); for real data the tasks' training pairs."""
    ds = ctx.config.dataset
    if ds.kind == "synthetic":
        return [p for t in synthetic_family(ds.n_pairs, seed=ds.seed + PRETRAIN_IMAGE_SEED_OFFSET) for p in t.pairs]
    return [p for t in ctx.split.seen + ctx.split.unseen for p in t.pairs]


@with_config_threads
def ensure_base(ctx: BuildContext, progress: bool = True) -> None:
    base = ctx.base_weights
    if base is not None and not base.exists():
        pretrain_base(ctx.config.model_name, pretraining_pairs(ctx), base, steps=ctx.config.pretrain_base_steps,
                      progress=progress)


def adapted_backbone(ctx: BuildContext, device: str = "cpu") -> tuple[Backbone, LoRALayout]:
    backbone = load_backbone(ctx.config.model_name, ctx.pretrained(), device)
    return backbone, inject_lora(backbone.model, ctx.config.lora)


def expert_shared(ctx: BuildContext, engine: LocalEngine | RayEngine) -> dict:
    """What every expert task needs, prepared once: model, weights, LoRA and training config, device.

    Ray tasks get local base weights as bytes (through the object store, once), so workers need no shared
    filesystem; the local engine reads the file where it is. A pretrained tag is loaded by each worker.
    """
    pretrained = ctx.pretrained()
    if engine.name == "ray" and pretrained is not None and os.path.isfile(pretrained):
        weights = {"data": Path(pretrained).read_bytes(), "suffix": Path(pretrained).suffix}
    else:
        weights = {"pretrained": pretrained}
    device = "cuda" if engine.resources.num_gpus > 0 else "cpu"
    return {"model_name": ctx.config.model_name, "weights": weights, "lora": ctx.config.lora.to_dict(),
            "experts": asdict(ctx.config.experts), "device": device}


@with_config_threads
def step_train_experts(ctx: BuildContext, shard: int = 0, num_shards: int = 1, progress: bool = True,
                       engine: LocalEngine | RayEngine | None = None) -> list[str]:
    """Train this shard's missing experts on `engine` (default: local); returns the names trained."""
    ensure_base(ctx, progress)
    engine = engine or LocalEngine()
    ctx.experts_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_tasks(ctx.split.seen, ctx.experts_dir, shard, num_shards)
    items = ((t.name, task_item(t)) for t in todo)
    trained = []
    try:
        for name, result in engine.map(train_expert_item, items, shared=expert_shared(ctx, engine), total=len(todo),
                                       desc=f"experts (shard {shard}/{num_shards})", progress=progress,
                                       threads=ctx.config.threads):
            write_expert(expert_path(ctx.experts_dir, name), record_from_result(name, result))
            trained.append(name)
    finally:
        release_worker_state()  # the local engine's backbone: not needed once the experts are written
    return trained


@with_config_threads
def step_build_library(ctx: BuildContext, cvae: TrainedCVAE | None = None, artifacts: dict | None = None) -> str:
    backbone, layout = adapted_backbone(ctx)
    return build_library(ctx.out, ctx.experts_dir, ctx.split.seen, base_model=ctx.base_model_record(backbone),
                         lora_config=ctx.config.lora, layout=layout, index_factory=ctx.config.index_factory,
                         cvae=cvae, base_weights_file=ctx.base_weights, dtype=ctx.config.library_dtype,
                         artifacts=artifacts, build=build_environment(ctx.config.threads))


def held_out_of_seen(ctx: BuildContext, backbone: Backbone) -> dict[str, HeldOut]:
    """The seen tasks' held-out pairs (never trained on): what validation and the transfer matrix score on."""
    return {t.name: HeldOut.of(backbone, ctx.split.test_pairs[t.name]) for t in ctx.split.seen
            if ctx.split.test_pairs.get(t.name)}


def seen_wordings(ctx: BuildContext, backbone: Backbone) -> dict[str, np.ndarray]:
    """Seen task -> [P, e] embeddings of its build-side wordings (offline/phrasing.py); {} when the data has none."""
    return {t.name: describe(backbone, list(t.phrasings)).cpu().numpy() for t in ctx.split.seen if t.phrasings}


def out_of_domain_embeddings(ctx: BuildContext, backbone: Backbone) -> np.ndarray | None:
    """The synthetic out-of-domain descriptions the gate is calibrated on (only for data that has wordings)."""
    if not any(t.phrasings for t in ctx.split.seen):
        return None
    return describe(backbone, list(build_out_of_domain())).cpu().numpy()


@with_config_threads
def make_loto(ctx: BuildContext, store: Store) -> tuple[LOTO | None, dict]:
    """(LOTO scorer or None when the store has no transfer matrix, the matrix's tensors)."""
    tensors = routing_tensors(store)
    if not tensors:
        return None, {}
    backbone, layout = adapted_backbone(ctx)
    held_out = held_out_of_seen(ctx, backbone)
    tm = TransferMatrix([i for i in store.bank.ids if i in held_out], list(store.bank.ids),
                        tensors["gains"].astype("float64"), tensors["mask"].astype(bool),
                        tensors["zero_shot"].astype("float64"))
    wordings = {t: q for t, q in seen_wordings(ctx, backbone).items() if t in tm.task_ids}
    router_fit = store.routing.validation.get("router_fit", {})
    return LOTO(store, backbone, layout, held_out, tm, wordings, router_fit), tensors


@with_config_threads
def step_validate(ctx: BuildContext, progress: bool = True, engine: LocalEngine | RayEngine | None = None) -> str:
    """Transfer matrix (on `engine`, one item per seen task) + router + every choice by leave-one-task-out
    retrieval, recorded in the store."""
    store = load_store(ctx.out)
    pairs = {t.name: ctx.split.test_pairs[t.name] for t in ctx.split.seen if ctx.split.test_pairs.get(t.name)}
    if not pairs:
        logger.warning("no held-out pairs for the seen tasks: the store is not validated (paper defaults)")
        return store.version
    engine = engine or LocalEngine()
    shared = expert_shared(ctx, engine) | {"mu": store.bank.mu.numpy()}
    try:
        transfer = measure_transfer(shared, store.bank.ids, store.bank.embeddings, pairs, engine,
                                    nearest=ctx.config.transfer_nearest, progress=progress,
                                    threads=ctx.config.threads)
    finally:
        release_worker_state()
    backbone, layout = adapted_backbone(ctx)
    held_out = held_out_of_seen(ctx, backbone)
    routing, _ = validate(store, backbone, layout, held_out, transfer, progress=progress,
                          phrasings=seen_wordings(ctx, backbone), out_of_domain=out_of_domain_embeddings(ctx, backbone))
    return step_build_library(ctx, artifacts={ROUTING_ARTIFACT: routing_artifact(routing, transfer.to_tensors())})


def cvae_prior(routing: StoreRouting | None) -> str:
    """The merge the CVAE is conditioned on: the best-validated one (the paper's µ* without validation)."""
    if routing is None:
        return "topk_weighted"
    table = routing.validation.get("table", {})
    merges = [s for s in ("transfer_routed", "delta_merge", "topk_weighted") if s in table]
    return max(merges, key=lambda s: table[s]["loto_mr1"]) if merges else "topk_weighted"


@with_config_threads
def step_train_cvae(ctx: BuildContext, progress: bool = True) -> str:
    """The CVAE, conditioned on the best-validated merge and early-stopped by LOTO retrieval when validated."""
    store = load_store(ctx.out)
    loto, tensors = make_loto(ctx, store)
    select = None if loto is None else partial(score_cvae, loto)
    cvae = train_cvae(store, ctx.experts_dir, ctx.config.cvae, cvae_prior(store.routing), select, progress)
    if loto is None:
        return step_build_library(ctx, cvae=cvae)
    routing = with_cvae_rows(store.routing, cvae, loto)
    return step_build_library(ctx, cvae=cvae, artifacts={ROUTING_ARTIFACT: routing_artifact(routing, tensors)})


def build(config: BuildConfig, out: Path, progress: bool = True,
          engine: LocalEngine | RayEngine | None = None) -> dict:
    """The whole offline job (experts on `engine`, default local); returns timings and what was done."""
    ctx = make_context(config, out)
    timings, t0 = {}, time.perf_counter()
    trained = step_train_experts(ctx, progress=progress, engine=engine)
    timings["experts_s"] = time.perf_counter() - t0
    step_build_library(ctx)
    timings["library_s"] = time.perf_counter() - t0 - timings["experts_s"]
    t1 = time.perf_counter()
    step_validate(ctx, progress=progress, engine=engine)
    timings["validate_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    version = step_train_cvae(ctx, progress=progress)
    timings["cvae_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    return {"version": version, "experts_trained": trained, "timings": timings}
