"""The offline job: expert statistics, idempotent/sharded training, store integrity, and SG-LoRA end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from app.ml.backbone import load_backbone
from app.ml.lora import LoRAConfig, inject_lora, layout_from_model_config, shared_init
from app.ml.retrieval import embed_pairs, recall_at_k, same_caption_mask
from app.ml.store import StoreError, load_store, routing_record
from app.ml.strategies import GenerationRequest, default_strategy, generate_adapters
from offline.data import synthetic_family
from offline.train_cvae import train_cvae
from offline.train_experts import ExpertTrainingConfig, describe, train_expert, train_experts

from .conftest import TINY

GENERATED = ("topk_weighted", "transfer_routed", "sglora", "default")  # default: what the service serves, gated
SMALL = ExpertTrainingConfig(steps=12, lr=1e-2, batch_size=16, keep_last=5)
BOTH = LoRAConfig(towers=("vision", "text"))


def test_expert_moments_equal_mean_and_var_of_kept_checkpoints(tiny_backbone):
    inject_lora(tiny_backbone.model, BOTH)
    task = synthetic_family(n_pairs=24)[0]
    result = train_expert(tiny_backbone, BOTH, task.pairs, SMALL)
    assert result.checkpoints.shape[0] == SMALL.keep_last
    assert not torch.equal(result.checkpoints[0], result.checkpoints[-1]), "checkpoints should differ step to step"
    torch.testing.assert_close(result.mu, result.checkpoints.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.var, result.checkpoints.var(0, correction=0), atol=1e-8, rtol=1e-4)


def _train(backbone, layout, tasks, out, **kw):
    return train_experts(backbone, layout, BOTH, tasks, SMALL, out, progress=False, **kw)


def test_rerun_trains_nothing_and_two_shards_equal_one_run(tiny_backbone, tmp_path):
    layout = inject_lora(tiny_backbone.model, BOTH)
    tasks = synthetic_family(n_pairs=16)[:5]
    assert len(_train(tiny_backbone, layout, tasks, tmp_path / "one")) == 5
    assert _train(tiny_backbone, layout, tasks, tmp_path / "one") == []
    shard0 = _train(tiny_backbone, layout, tasks, tmp_path / "sharded", shard=0, num_shards=2)
    shard1 = _train(tiny_backbone, layout, tasks, tmp_path / "sharded", shard=1, num_shards=2)
    assert not set(shard0) & set(shard1) and sorted(shard0 + shard1) == sorted(t.name for t in tasks)
    for task in tasks:
        a = load_file(str(tmp_path / "one" / f"{task.name}.safetensors"))
        b = load_file(str(tmp_path / "sharded" / f"{task.name}.safetensors"))
        for key in ("mu", "var", "checkpoints", "embedding"):
            assert torch.equal(a[key], b[key]), f"{task.name}/{key} differs between sharded and unsharded runs"


def test_store_for_another_layout_or_model_is_refused(tiny_build):
    store = load_store(tiny_build.out)
    with pytest.raises(StoreError, match="ViT-B-16.*tiny_clip"):
        load_store(tiny_build.out, expected_layout=layout_from_model_config("ViT-B-16", LoRAConfig()))
    with pytest.raises(StoreError, match="base weights"):
        load_store(tiny_build.out, expected_layout=store.layout, expected_weights_id="tag:openai")


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_damaged_store_files_are_detected(tiny_build, tmp_path, damage):
    copy = tmp_path / "store"
    shutil.copytree(tiny_build.out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = manifest["library"]["segments"][0]["file"] if manifest["format_version"] == 2 else "library.safetensors"
    target = copy / name
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "edit":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(StoreError, match=name):
        load_store(copy)


def test_manifest_records_what_the_store_was_built_from(tiny_build):
    manifest = json.loads((tiny_build.out / "manifest.json").read_text())
    assert manifest["base_model"]["name"] == TINY
    assert manifest["base_model"]["weights_id"].startswith("sha256:")
    assert manifest["layout"]["D"] == load_store(tiny_build.out).layout.D
    assert len(manifest["experts"]) == len(tiny_build.split.seen)
    assert manifest["cvae"]["info"]["leave_self_out"] is True
    assert all("final_loss" in e["provenance"] for e in manifest["experts"])


def test_rebuild_trains_no_expert(tiny_build):
    from offline import pipeline

    assert pipeline.step_train_experts(tiny_build, progress=False) == []


def test_cvae_is_the_step_with_the_best_held_out_retrieval(tiny_build):
    manifest = json.loads((tiny_build.out / "manifest.json").read_text())
    info = manifest["cvae"]["info"]
    assert len(info["val_experts"]) == round(tiny_build.config.cvae.val_fraction * len(tiny_build.split.seen))
    assert set(info["val_experts"]) <= {t.name for t in tiny_build.split.seen}
    assert 0 <= info["best_step"] <= info["steps"]
    assert info["selection"].startswith("leave-one-task-out")
    # Conditioned on the merge validation ranked best, and step 0 (the decoder returns that prior's µ*) is a
    # candidate, so the kept model never retrieves worse than its prior on the held-out experts' tasks.
    table = routing_record(manifest)["validation"]["table"]
    assert info["prior"] == max(("topk_weighted", "delta_merge", "transfer_routed"), key=lambda s: table[s]["loto_mr1"])
    assert info["val_mr1"] >= info["val_mr1_of_prior"]


def _sample_bytes(store, query, seed):
    gen = generate_adapters(store, "sglora", GenerationRequest(query=query, seed=seed))
    return save({"lora": gen.vectors[0].contiguous()})


def test_same_seed_same_bytes_other_seed_other_sample(tiny_build):
    store = load_store(tiny_build.out)
    # The store's CVAE is early-stopped and may be its step 0, where z is unused and every seed decodes µ*; a CVAE
    # trained to its last step (no held-out experts) makes this a test of the sampler itself.
    cfg = replace(tiny_build.config.cvae, steps=60, val_fraction=0.0)
    store.cvae = train_cvae(store, tiny_build.experts_dir, cfg, progress=False)
    assert store.cvae.info["best_step"] == 60
    query = store.bank.embeddings[0]
    assert _sample_bytes(store, query, 7) == _sample_bytes(store, query, 7)
    assert _sample_bytes(store, query, 7) != _sample_bytes(store, query, 8)


@pytest.fixture(scope="module")
def unseen_results(tiny_build):
    """Per unseen task: the oracle (an expert trained on the task itself), each strategy's adapter, and R@1."""
    store = load_store(tiny_build.out)
    backbone = load_backbone(store.base_model["name"], store.base_pretrained(), "cpu")
    layout = inject_lora(backbone.model, store.lora_config)
    results = []
    for task in tiny_build.split.unseen:
        oracle = train_expert(backbone, store.lora_config, task.pairs, tiny_build.config.experts).mu
        query = describe(backbone, [task.description])[0].numpy()
        adapters = {"zero_shot": None, "oracle": oracle}
        for strategy in GENERATED:  # K and τ: what the store's validation chose for each
            name = default_strategy(store) if strategy == "default" else strategy
            request = GenerationRequest(query=query, seed=0, gate=strategy == "default")
            adapters[strategy] = generate_adapters(store, name, request).vectors[0]
        test = tiny_build.split.test_pairs[task.name]
        r1 = {}
        for name, adapter in adapters.items():
            img, txt = embed_pairs(backbone, layout, adapter, [p.image for p in test], [p.caption for p in test])
            recall = recall_at_k(img @ txt.T, ks=(1,), positives=same_caption_mask([p.caption for p in test]))
            r1[name] = (recall["i2t"][1] + recall["t2i"][1]) / 2
        results.append({"task": task.name, "adapters": adapters, "r1": r1,
                        "init": shared_init(layout, store.lora_config)})
    return results


def _mean_r1(results, strategy):
    return sum(r["r1"][strategy] for r in results) / len(results)


def test_the_synthetic_setup_has_oracle_headroom(unseen_results):
    # Without headroom (an expert trained on the task itself beating zero-shot) no comparison below means anything.
    assert _mean_r1(unseen_results, "oracle") > _mean_r1(unseen_results, "zero_shot") + 8.0


def test_generated_adapters_stay_near_the_expert_manifold(unseen_results):
    # Generated adapters are no further from the oracle than the furthest library expert typically is: they are
    # recombinations of experts, not noise. (A broken decoder or de-normalisation lands far outside.)
    for r in unseen_results:
        init_gap = torch.dist(r["init"], r["adapters"]["oracle"])
        for strategy in GENERATED:
            assert torch.dist(r["adapters"][strategy], r["adapters"]["oracle"]) < 2.0 * init_gap, (r["task"], strategy)


# Trained-store floats differ between CPUs (a fresh machine measured 7 of 8 tasks where this one had 8 of 8), so
# every claim below is about the mean over the unseen tasks or most of them, with margins, never every task.
MARGIN_R1 = 2.0  # points of mean(I2T, T2I) R@1, averaged over the unseen tasks
MOST = 0.75  # share of tasks a per-task claim must hold on


def test_generated_adapters_beat_zero_shot_and_point_towards_the_oracle(unseen_results):
    mean = {s: _mean_r1(unseen_results, s) for s in ("zero_shot", *GENERATED, "oracle")}
    print("unseen-task mean R@1:", {k: round(v, 1) for k, v in mean.items()})
    for strategy in GENERATED:
        assert mean[strategy] >= mean["zero_shot"] + MARGIN_R1, (strategy, mean)
    for strategy in ("topk_weighted",):  # in the experts' own factor gauge; ΔW-merged ones are re-factorised by SVD
        # (The plain distance to the oracle is not a fair yardstick: a single routed expert's A has moved as far
        # from the shared init as the oracle's, in another direction, so it can be further than the zero vector
        # while it retrieves far better.) Scale-free: measured from the shared init every expert starts at, the
        # generated adapter moves towards the oracle on average (a random direction in D = 3,072: cosine ≈ 0 ± 0.02).
        # How far depends on K, which validation picks per store (0.08–0.3 measured): only the sign is the claim.
        cosines = [F.cosine_similarity(r["adapters"][strategy] - r["init"], r["adapters"]["oracle"] - r["init"], dim=0)
                   for r in unseen_results]
        # Mean over 8 tasks of a random direction: 0 ± 0.007; 0.03 is > 4 σ and held on every machine we built on.
        assert sum(cosines) / len(cosines) > 0.03, (strategy, [round(c.item(), 3) for c in cosines])
