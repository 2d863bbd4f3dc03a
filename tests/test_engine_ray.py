"""The offline build on Ray (offline/engine.py): one real local Ray (num_cpus=2) for the module.

A reduced tiny build (6 experts, few steps) on the Ray engine equals the local engine's build byte for byte
(expert files and store manifest) although Ray's workers default to one thread and this process runs at the
machine's default thread count: the build pins its own (offline/threads.py). A re-run trains nothing and a
deleted expert is retrained to the same bytes; a worker killed mid-item is retried by Ray; an item's own error
names the item and is not retried.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from offline import pipeline
from offline.config import TINY, DatasetConfig
from offline.engine import EngineTaskError, LocalEngine, make_engine
from offline.train_experts import ExpertTrainingConfig

from .engine_tasks import die_once, fail_on

N_EXPERTS = 6
REDUCED = replace(
    TINY,
    pretrain_base_steps=1,  # a base weights file that Ray must hand to its workers; quality is not under test
    dataset=DatasetConfig(kind="synthetic", n_pairs=24, n_unseen=8, n_test_pairs=6),
    experts=ExpertTrainingConfig(steps=8, lr=1e-2, batch_size=8, keep_last=3),
    k=3,
    cvae=replace(TINY.cvae, steps=10, eval_every=5, batch_size=8),
)


@pytest.fixture(scope="module")
def ray_engine():
    engine = make_engine("ray", num_cpus=1, cluster_cpus=2)
    try:
        yield engine
    finally:
        engine.close()


def _build(out: Path, engine) -> tuple[pipeline.BuildContext, list[str]]:
    ctx = pipeline.make_context(REDUCED, out)
    ctx.split.seen = ctx.split.seen[:N_EXPERTS]  # few experts: the engine is under test, not the library
    trained = pipeline.step_train_experts(ctx, progress=False, engine=engine)
    pipeline.step_build_library(ctx)
    pipeline.step_train_cvae(ctx, progress=False)
    return ctx, trained


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, ray_engine):
    root = tmp_path_factory.mktemp("engines")
    before = torch.get_num_threads()
    # The machine's default thread count (conftest pins 2), at least 2 so it differs from the build's 1: with this
    # config, experts trained with 1 and 2 threads differ in every file, so the build must pin its own.
    torch.set_num_threads(max(2, os.cpu_count() or 1))
    try:
        local_ctx, local_trained = _build(root / "local" / "store", LocalEngine())
    finally:
        torch.set_num_threads(before)
    ray_ctx, ray_trained = _build(root / "ray" / "store", ray_engine)
    return local_ctx, local_trained, ray_ctx, ray_trained


def test_ray_build_equals_local_build(two_builds):
    local_ctx, local_trained, ray_ctx, ray_trained = two_builds
    assert sorted(local_trained) == sorted(ray_trained) == sorted(t.name for t in local_ctx.split.seen)
    assert len(ray_trained) == N_EXPERTS
    # The shared preparation: the driver pretrained the base once; the Ray workers loaded it from the bytes
    # they were handed, so the experts record the same weights and layout.
    assert _digests(local_ctx.work) == _digests(ray_ctx.work)  # base_weights.safetensors
    local_experts, ray_experts = _digests(local_ctx.experts_dir), _digests(ray_ctx.experts_dir)
    assert len(ray_experts) == N_EXPERTS
    assert local_experts == ray_experts, "Ray-trained expert files differ from the local ones"
    local_manifest = json.loads((local_ctx.out / "manifest.json").read_text())
    ray_manifest = json.loads((ray_ctx.out / "manifest.json").read_text())
    assert local_manifest.pop("created_unix") <= ray_manifest.pop("created_unix")  # the one field that differs
    assert local_manifest == ray_manifest  # version, every file's sha256, experts' provenance, CVAE info
    assert local_manifest["build"]["threads"] == REDUCED.threads  # what it was built with, recorded
    assert local_manifest["build"]["torch"] == torch.__version__


def test_ray_rerun_trains_nothing_and_a_missing_expert_is_retrained_identically(two_builds, ray_engine):
    _, _, ray_ctx, _ = two_builds
    before = _digests(ray_ctx.experts_dir)
    assert pipeline.step_train_experts(ray_ctx, progress=False, engine=ray_engine) == []
    victim = sorted(before)[2]
    (ray_ctx.experts_dir / victim).unlink()  # as if the run had stopped before this expert was written
    assert pipeline.step_train_experts(ray_ctx, progress=False, engine=ray_engine) == [victim.removesuffix(
        ".safetensors")]
    assert _digests(ray_ctx.experts_dir) == before


# ------------------------------------------------------------------------------------------- failures


def test_a_killed_worker_s_item_is_retried(ray_engine, tmp_path):
    items = [(k, k) for k in ("a", "b", "c")]
    shared = {"markers": str(tmp_path), "kill": ["b"]}
    results = dict(ray_engine.map(die_once, items, shared=shared, progress=False))
    assert sorted(results) == ["a", "b", "c"] and all(r["item"] == k for k, r in results.items())
    assert results["b"]["killed_pid"] is not None, "b's first attempt never ran"
    assert results["b"]["pid"] != results["b"]["killed_pid"], "the retry ran in a new worker process"


def test_an_item_error_names_the_item_and_is_not_retried(ray_engine):
    items = [(k, k) for k in ("ok1", "bad", "ok2")]
    with pytest.raises(EngineTaskError, match="'bad'.*cannot process bad"):
        list(ray_engine.map(fail_on, items, shared={"bad": "bad"}, progress=False))
    with pytest.raises(EngineTaskError, match="'bad'"):
        list(LocalEngine().map(fail_on, items, shared={"bad": "bad"}, progress=False))
