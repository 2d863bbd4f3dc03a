"""add-experts / remove-experts on a copy of the tiny store: PEFT folders made with `peft`, served adapters,
train-experts experts; refused imports leave the store byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from app.ml import hf_clip
from app.ml.aggregator import aggregate_experts
from app.ml.backbone import load_backbone
from app.ml.retrieval import embed_descriptions
from app.ml.store import StoreError, load_store, read_manifest
from offline.import_experts import add_experts, remove_experts
from tests.conftest import TINY, copy_tiny_store
from tests.test_store_format import snapshot

NEW_DESCRIPTION = "a photo of a violet spiral on a checkerboard"


@pytest.fixture(scope="module")
def base(tiny_build):
    store = load_store(tiny_build.out)
    return load_backbone(store.base_model["name"], store.base_pretrained(), "cpu")


@pytest.fixture
def store_copy(tiny_build, tmp_path) -> Path:
    return copy_tiny_store(tiny_build, tmp_path / "store")


def peft_folder(path: Path, layout, *, r=2, alpha=8.0, towers=("vision", "text"), width=None, rslora=False,
                base_name=None, seed=0) -> Path:
    """A LoRA made with `peft` on a random-weight Hugging Face CLIPModel shaped like the tiny open_clip config."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel

    cfg = hf_clip.hf_clip_config(open_clip.get_model_config(TINY))
    if width is not None:  # another model: every width changes
        for tower in ("vision_config", "text_config"):
            cfg[tower] |= {"hidden_size": width, "intermediate_size": 4 * width}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**cfg))
    targets = [m for m in hf_clip.peft_target_modules(layout)
               if any(m.startswith(hf_clip.HF_BLOCKS[t]) for t in towers)]
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                                                  base_model_name_or_path=base_name))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)  # PEFT starts B at zero; a trained adapter has both factors non-zero
    peft_model.save_pretrained(path)
    if base_name is not None:  # save_pretrained writes the model's own name; this one pretends to be another base
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base_name}))
    (path / "description.txt").write_text(NEW_DESCRIPTION)
    return path


def test_a_lower_rank_peft_adapter_is_padded_and_the_import_says_so(tiny_build, tmp_path):
    from offline.import_experts import read_peft

    store = load_store(tiny_build.out)
    folder = peft_folder(tmp_path / "rank-one", store.layout, r=1, alpha=2.0)
    imported = read_peft(folder, store.layout, store.lora_config, None)
    assert imported.notes == [f"rank-one: rank r=1 zero-padded to the store's rank {store.layout.rank} (ΔW is "
                              "unchanged; the padded rank is empty, so this expert adds a rank-1 update)"]
    assert read_peft(peft_folder(tmp_path / "rank-two", store.layout, r=2), store.layout, store.lora_config,
                     None).notes == []


def test_peft_adapter_imports_with_its_scale_converted_and_routes(store_copy, tmp_path, base):
    layout, lora = load_store(store_copy).layout, load_store(store_copy).lora_config
    folder = peft_folder(tmp_path / "violet-spiral", layout, r=2, alpha=8.0)
    summary = add_experts(store_copy, [folder], backbone=base)
    assert summary["added"] == ["violet-spiral"]

    from safetensors.torch import load_file

    peft_state = load_file(str(folder / "adapter_model.safetensors"))
    store = load_store(store_copy, mmap_library=True)
    assert store.version == summary["version"] == read_manifest(store_copy)["version"]
    row = store.bank.row_of("violet-spiral")
    mu, var = (t[0] for t in store.bank.gather([row]))
    assert torch.equal(var, torch.zeros_like(var))  # one checkpoint: within-expert σ² = 0
    ratio = (8.0 / 2) / lora.scale  # PEFT's alpha/r over the store's alpha/r
    assert ratio == 2.0
    for entry in layout.entries:  # the flat vector is the PEFT factors on the layout, B rescaled
        key = "base_model.model." + hf_clip.to_hf_module(entry.name)
        expected = peft_state[key] * (ratio if ".lora_B." in entry.name else 1.0)
        torch.testing.assert_close(mu[entry.offset : entry.offset + entry.numel].reshape(entry.shape), expected,
                                   rtol=0, atol=1e-7)
    # ΔW itself is preserved: s_peft · B A (PEFT) == s_store · B' A (store), for one projection of each tower.
    for path, _ in layout.blocks[:: len(layout.blocks) // 2]:
        a = [e for e in layout.entries if e.name == f"{path}.q_proj.lora_A.weight"][0]
        b = [e for e in layout.entries if e.name == f"{path}.q_proj.lora_B.weight"][0]
        hf = "base_model.model." + hf_clip.to_hf_module(f"{path}.q_proj")
        delta_peft = 4.0 * peft_state[f"{hf}.lora_B.weight"] @ peft_state[f"{hf}.lora_A.weight"]
        delta_store = lora.scale * mu[b.offset : b.offset + b.numel].reshape(b.shape) @ \
            mu[a.offset : a.offset + a.numel].reshape(a.shape)
        torch.testing.assert_close(delta_store, delta_peft, rtol=1e-5, atol=1e-7)
    # Its description now routes to it.
    query = embed_descriptions(base, [NEW_DESCRIPTION])[0].numpy()
    assert aggregate_experts(store.bank, query, k=4).trace.expert_ids[0] == "violet-spiral"
    provenance = store.manifest["experts"][row]["provenance"]
    assert provenance["sigma2"] == "zero: single checkpoint" and provenance["scale_ratio"] == 2.0


@pytest.mark.parametrize("bad", ["rank", "width", "tower", "base", "duplicate"])
def test_a_source_that_does_not_fit_is_refused_and_the_store_is_untouched(store_copy, tmp_path, base, bad):
    layout = load_store(store_copy).layout
    existing = read_manifest(store_copy)["experts"][0]["id"]
    kwargs, match = {
        "rank": ({"r": 4}, r"adapter rank r=4 exceeds the store's rank 2"),
        "width": ({"width": 32}, r"expected shape \[64, 2\], got \[32, 2\]"),
        "tower": ({"towers": ("vision",)},
                  r"adapts towers \['vision'\], the store's layout adapts \['vision', 'text'\]"),
        "base": ({"base_name": "openai/clip-vit-base-patch16"},
                 r"made for base model 'openai/clip-vit-base-patch16', the store's base is a local"),
        "duplicate": ({}, rf"already in the library.*'{existing}'"),
    }[bad]
    folder = peft_folder(tmp_path / (existing if bad == "duplicate" else "x"), layout, **kwargs)
    before = snapshot(store_copy)
    with pytest.raises(StoreError, match=match):
        add_experts(store_copy, [folder], backbone=base)
    assert snapshot(store_copy) == before


def test_served_adapter_and_trained_expert_import(store_copy, tmp_path, tiny_build, base):
    from app.services.engine import Engine
    from app.services.generator import GenerationParams, generate_files

    engine = Engine(store_copy, "cpu")
    engine.load()
    files = generate_files(engine, GenerationParams("a photo of a teal triangle", "topk_weighted", 2, 0.05, 0, 1))
    adapter = tmp_path / f"{files[0].adapter_id}.safetensors"
    adapter.write_bytes(files[0].data)
    expert_id = read_manifest(store_copy)["experts"][3]["id"]
    remove_experts(store_copy, [expert_id])
    assert expert_id not in load_store(store_copy).bank.ids
    expert_file = tiny_build.experts_dir / f"{expert_id}.safetensors"
    old = engine.store
    added = add_experts(store_copy, [adapter, expert_file], backbone=base)
    # The engine follows the version pointer (what a watcher or POST /admin/reload calls) ...
    assert engine.reload_if_changed()["version"] == added["version"] == engine.version
    assert engine.reload_if_changed()["changed"] is False
    # ... and a request that started on the previous version finishes on it.
    params = GenerationParams("a photo of a teal triangle", "topk_weighted", 2, 0.05, 1, 1)
    assert generate_files(engine, params, store=old)[0].metadata["store_version"] == old.version != added["version"]
    assert generate_files(engine, params)[0].metadata["store_version"] == added["version"]
    store = load_store(store_copy)
    # The served adapter comes back as its own vector (same scale), σ² = 0, with the description it was made for.
    row = store.bank.row_of(files[0].adapter_id)
    torch.testing.assert_close(store.bank.mu[row], files[0].vector, rtol=0, atol=0)
    assert store.bank.descriptions[row] == "a photo of a teal triangle"
    # The expert's mu/var are the moments of its checkpoints: what build-library put in the library.
    from safetensors.torch import load_file

    checkpoints = load_file(str(expert_file))["checkpoints"].double()
    torch.testing.assert_close(store.bank.mu[store.bank.row_of(expert_id)], checkpoints.mean(0).float())
    torch.testing.assert_close(store.bank.var[store.bank.row_of(expert_id)],
                               checkpoints.var(0, unbiased=False).float())
    assert not torch.equal(store.bank.var[store.bank.row_of(expert_id)], torch.zeros(store.layout.D))


def test_cli_names_what_does_not_fit(store_copy, tmp_path):
    from typer.testing import CliRunner

    from offline.__main__ import cli

    layout = load_store(store_copy).layout
    folder = peft_folder(tmp_path / "wide", layout, r=4)
    before = snapshot(store_copy)
    result = CliRunner().invoke(cli, ["add-experts", "--store", str(store_copy), str(folder)])
    assert result.exit_code == 1 and "rank r=4 exceeds the store's rank 2" in result.output, result.output
    assert "Traceback" not in result.output
    assert snapshot(store_copy) == before
    result = CliRunner().invoke(cli, ["remove-experts", "--store", str(store_copy), "no-such-expert"])
    assert result.exit_code == 1 and "not in the library: ['no-such-expert']" in result.output
    assert snapshot(store_copy) == before
