"""Store format 2: memory-mapped segments, fp16 on disk, integrity, append-only updates, artifacts, v1 migration.

Synthetic stores on the tiny layout (no backbone needed): fast, and every number is known.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.ml.aggregator import ExpertBank, aggregate_experts, build_index, uniform_prior
from app.ml.lora import LoRAConfig, layout_from_model_config
from app.ml.store import (
    NewExperts,
    StoreError,
    load_store,
    migrate_store,
    read_manifest,
    update_store,
    verify_store,
    write_artifact,
    write_store,
)
from tests.conftest import TINY

EMB = 32


def unit_rows(rng, n, width=EMB):
    x = rng.standard_normal((n, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(rng, n, D, prefix="e"):
    """records, mu, var [n, D] (LoRA-sized values), embeddings [n, e]."""
    mu = torch.from_numpy(rng.normal(0, 0.02, (n, D)).astype(np.float32))
    var = torch.from_numpy(rng.gamma(2.0, 1e-4, (n, D)).astype(np.float32))
    records = [{"id": f"{prefix}{i}", "description": f"a photo of {prefix} thing {i}", "provenance": {"n": i}}
               for i in range(n)]
    return records, mu, var, unit_rows(rng, n)


def make_store(path: Path, n=10, dtype="float32", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    layout = layout_from_model_config(TINY, LoRAConfig())
    records, mu, var, emb = synthetic(rng, n, layout.D)
    bank = ExpertBank([r["id"] for r in records], [r["description"] for r in records], mu, var, emb,
                      build_index(emb))
    write_store(path, base_model={"name": TINY, "pretrained": None, "weights_id": "sha256:test"},
                lora_config=LoRAConfig(), layout=layout, bank=bank, experts=records, index_factory="Flat",
                dtype=dtype)
    return {"mu": mu, "var": var, "emb": emb, "layout": layout, "records": records}


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (hidden ones too) -> sha256: byte-identical means equal snapshots."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ reading


def test_fp16_mapped_and_fp32_in_memory_aggregate_alike(tmp_path):
    ref = make_store(tmp_path / "f32", n=600, dtype="float32")  # 600 > one segment of 512 rows
    make_store(tmp_path / "f16", n=600, dtype="float16")
    f32 = load_store(tmp_path / "f32")  # dense float32 tensors
    f16 = load_store(tmp_path / "f16", mmap_library=True)
    assert isinstance(f32.bank.mu, torch.Tensor) and not isinstance(f16.bank.mu, torch.Tensor)
    assert len(read_manifest(tmp_path / "f16")["library"]["segments"]) == 2
    assert torch.equal(f32.bank.mu, ref["mu"])  # fp32 round-trips exactly
    # fp16 keeps 11 significant bits: each stored element is off by <= 2^-11 of its magnitude; the mixture is a
    # convex combination of them (and, for σ*², of squared differences of them), so errors scale with the data.
    eps = 2.0**-11
    atol_mu = eps * float(ref["mu"].abs().max())
    atol_var = eps * float(ref["var"].max()) + 4 * float(ref["mu"].abs().max()) * atol_mu
    rng = np.random.default_rng(5)
    for query in unit_rows(rng, 5):
        a = aggregate_experts(f32.bank, query, k=4, tau=0.05)
        b = aggregate_experts(f16.bank, query, k=4, tau=0.05)
        assert a.trace.expert_ids == b.trace.expert_ids
        assert b.mu.dtype == torch.float32 and b.var.dtype == torch.float32
        torch.testing.assert_close(b.mu, a.mu, rtol=0, atol=atol_mu)
        torch.testing.assert_close(b.var, a.var, rtol=0, atol=atol_var)
        assert not torch.equal(b.mu, a.mu)  # the fp16 path really is another storage
    # A model soup over every row goes through the chunked two-pass path: same moments.
    soup32, soup16 = uniform_prior(f32.bank, range(600)), uniform_prior(f16.bank, range(600))
    torch.testing.assert_close(soup16.mu, soup32.mu, rtol=0, atol=atol_mu)
    torch.testing.assert_close(soup16.var, soup32.var, rtol=0, atol=atol_var)


def _segment(path: Path) -> Path:
    return path / read_manifest(path)["library"]["segments"][0]["file"]


def test_truncated_segment_is_named_at_open(tmp_path):
    make_store(tmp_path / "s", dtype="float16")
    seg = _segment(tmp_path / "s")
    seg.write_bytes(seg.read_bytes()[:-100])
    with pytest.raises(StoreError, match=f"segment {seg.relative_to(tmp_path / 's')} is truncated"):
        load_store(tmp_path / "s", mmap_library=True)


def test_edited_segment_is_named_before_its_rows_are_used(tmp_path):
    make_store(tmp_path / "s", dtype="float16")
    seg = _segment(tmp_path / "s")
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # the last expert's var row
    seg.write_bytes(bytes(data))
    store = load_store(tmp_path / "s", mmap_library=True)  # open stays cheap: rows are checked on first use
    name = seg.relative_to(tmp_path / "s").as_posix()
    store.bank.gather([0, 1])  # untouched rows serve
    with pytest.raises(StoreError, match=f"segment {name} is corrupt.*expert 'e9'"):
        store.bank.gather([9])
    with pytest.raises(StoreError, match=name):
        load_store(tmp_path / "s")  # the dense load reads (and checks) every row
    with pytest.raises(StoreError, match=name):
        verify_store(tmp_path / "s")


def test_stores_with_blake2b_row_digests_still_verify_and_keep_them_through_updates(tmp_path):
    """New stores record xxh3-128 row digests (hashed at memory speed on a request's first read); a store written
    before that has blake2b-128 digests and no `row_digest`: it reads, verifies, catches edits, and updates in kind."""
    from safetensors.numpy import load_file as load_numpy

    from app.ml.store import row_digest

    path = tmp_path / "s"
    ref = make_store(path, n=4, dtype="float16")
    manifest = read_manifest(path)
    assert manifest["library"]["row_digest"] == "xxh3-128"
    segment = load_numpy(str(_segment(path)))
    for i, record in enumerate(manifest["experts"]):
        assert record["digest"] == row_digest(segment["mu"][i], segment["var"][i], "xxh3-128")
        record["digest"] = row_digest(segment["mu"][i], segment["var"][i], "blake2b-128")
    del manifest["library"]["row_digest"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert verify_store(path)["rows"] == 4
    records, mu, var, emb = synthetic(np.random.default_rng(5), 2, ref["layout"].D, prefix="new")
    update_store(path, add=NewExperts(records, mu, var, emb))
    updated = read_manifest(path)
    assert updated["library"]["row_digest"] == "blake2b-128" and verify_store(path)["rows"] == 6
    data = bytearray(_segment(path).read_bytes())
    data[-3] ^= 0xFF
    _segment(path).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="expert 'e3'"):
        load_store(path, mmap_library=True).bank.gather([3])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_small_files_are_named(tmp_path, damage):
    make_store(tmp_path / "s")
    name = read_manifest(tmp_path / "s")["index"]["embeddings_file"]
    target = tmp_path / "s" / name
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    with pytest.raises(StoreError, match=name):
        load_store(tmp_path / "s")


# ------------------------------------------------------------------------------------------ updating


def test_add_and_remove_write_new_versions_and_leave_old_files_alone(tmp_path):
    path = tmp_path / "s"
    ref = make_store(path, n=6, dtype="float16")
    v1 = read_manifest(path)
    old = load_store(path, mmap_library=True)
    old_segment_bytes = _segment(path).read_bytes()
    records, mu, var, emb = synthetic(np.random.default_rng(9), 3, ref["layout"].D, prefix="new")
    v2 = update_store(path, add=NewExperts(records, mu, var, emb))
    assert v2 != v1["version"] and read_manifest(path)["parent_version"] == v1["version"]
    assert _segment(path).read_bytes() == old_segment_bytes  # append-only: the first segment is untouched
    new = load_store(path, mmap_library=True)
    assert new.bank.ids == [f"e{i}" for i in range(6)] + ["new0", "new1", "new2"]
    torch.testing.assert_close(new.bank.gather([7])[0][0], mu[1], rtol=0, atol=2e-4)
    assert aggregate_experts(new.bank, emb[2], k=1).trace.expert_ids == ["new2"]
    assert old.bank.gather([0])[0].shape[0] == 1  # a process on the previous version still reads it
    v3 = update_store(path, remove=["e0", "new1"])
    third = load_store(path, mmap_library=True)
    assert "e0" not in third.bank.ids and "new1" not in third.bank.ids and len(third.bank) == 7
    torch.testing.assert_close(third.bank.gather([third.bank.row_of("new2")])[0][0], mu[2], rtol=0, atol=2e-4)
    assert v3 not in (v1["version"], v2)


@pytest.mark.parametrize("bad", ["duplicate", "width", "unknown-remove"])
def test_a_refused_update_leaves_the_directory_byte_identical(tmp_path, bad):
    path = tmp_path / "s"
    ref = make_store(path, n=4)
    before = snapshot(path)
    records, mu, var, emb = synthetic(np.random.default_rng(1), 2, ref["layout"].D, prefix="x")
    if bad == "duplicate":
        records[1]["id"] = "e3"
        match = r"already in the library.*'e3'"
        call = dict(add=NewExperts(records, mu, var, emb))
    elif bad == "width":
        match = rf"expected mu/var of shape \[2, {ref['layout'].D}\], got \[2, 10\]"
        call = dict(add=NewExperts(records, mu[:, :10], var[:, :10], emb))
    else:
        match = "not in the library: .'nope'."
        call = dict(remove=["nope"])
    with pytest.raises(StoreError, match=match):
        update_store(path, **call)
    assert snapshot(path) == before


def test_artifacts_are_listed_and_marked_stale_when_the_library_changes(tmp_path):
    path = tmp_path / "s"
    ref = make_store(path, n=4)
    write_artifact(path, "router", {"w": torch.ones(3, 2)}, {"trained_steps": 5})
    write_artifact(path, "notes", {"x": torch.zeros(1)}, depends_on_library=False)
    store = load_store(path)
    tensors, record = store.artifact("router")
    assert torch.equal(tensors["w"], torch.ones(3, 2)) and record["record"] == {"trained_steps": 5}
    # A manifest section written by other code (the method's validated routing, say) is library-dependent too.
    manifest = read_manifest(path)
    (path / "manifest.json").write_text(json.dumps(manifest | {"routing": {"default_k": 3}}))
    records, mu, var, emb = synthetic(np.random.default_rng(2), 1, ref["layout"].D, prefix="y")
    update_store(path, add=NewExperts(records, mu, var, emb))
    assert read_manifest(path)["routing"]["stale"] is True and read_manifest(path)["routing"]["default_k"] == 3
    artifacts = read_manifest(path)["artifacts"]
    assert artifacts["router"]["stale"] is True and "y0" in artifacts["router"]["stale_reason"]
    assert artifacts["notes"]["stale"] is False
    store = load_store(path)
    with pytest.raises(StoreError, match="router.*stale"):
        store.artifact("router")
    assert store.artifact("router", allow_stale=True)[1]["stale"]
    verify_store(path)  # the artifact files are still listed and intact


# ------------------------------------------------------------------------------------------ format 1


def write_v1(path: Path, ref: dict) -> None:
    """A format-1 store as the previous code wrote it: one library.safetensors, index.faiss, files hashed."""
    import faiss

    from app.ml.backbone import file_sha256

    path.mkdir()
    save_file({"mu": ref["mu"], "var": ref["var"], "embeddings": torch.from_numpy(ref["emb"])},
              str(path / "library.safetensors"))
    faiss.write_index(build_index(ref["emb"]), str(path / "index.faiss"))
    files = {p.name: file_sha256(p) for p in sorted(path.iterdir())}
    manifest = {"format_version": 1, "version": "v1test", "base_model": {"name": TINY, "pretrained": None,
                "weights_id": "sha256:test"}, "lora": LoRAConfig().to_dict(), "layout": ref["layout"].to_manifest(),
                "experts": ref["records"], "index": {"factory": "Flat", "dim": EMB, "metric": "inner_product"},
                "cvae": None, "files": files}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_v1_store_loads_and_migrates_to_fp16_segments(tmp_path):
    ref = make_store(tmp_path / "ref", n=5)
    write_v1(tmp_path / "v1", ref)
    v1 = load_store(tmp_path / "v1")
    assert torch.equal(v1.bank.mu, ref["mu"])
    migrate_store(tmp_path / "v1", dtype="float16")
    migrated = load_store(tmp_path / "v1", mmap_library=True)
    assert migrated.manifest["format_version"] == 2 and migrated.dtype == "float16"
    assert migrated.bank.ids == v1.bank.ids
    torch.testing.assert_close(migrated.bank.gather(range(5))[0], ref["mu"], rtol=0, atol=2e-4)
    assert verify_store(tmp_path / "v1")["rows"] == 5
