"""The single reader/writer of model_store/: a versioned, self-describing directory of safetensors + JSON + FAISS.

    <store>/
      manifest.json            format, version, base model, LoRA config + layout, experts, index, cvae, file hashes
      library.safetensors      mu [E, D], var [E, D], embeddings [E, e]
      index.faiss              FAISS index over the embeddings (faiss' own binary format, no pickle)
      cvae.safetensors         CVAE weights + normaliser statistics (optional until train-cvae has run)
      base_weights.safetensors optional: a local base model file the store was built on (the tiny demo)

A store is written whole into a temporary sibling directory and renamed into place, so a reader never sees a
half-written store. Loading re-hashes every file against the manifest and checks the layout against the
model it is paired with; any mismatch raises `StoreError` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.ml.aggregator import ExpertBank
from app.ml.backbone import file_sha256
from app.ml.cvae import CVAE, CVAEConfig, TensorNormalizer
from app.ml.lora import LayoutMismatchError, LoRAConfig, LoRALayout, check_layout

FORMAT_VERSION = 1
BASE_WEIGHTS_FILE = "base_weights.safetensors"


class StoreError(ValueError):
    """A store that is missing, corrupt, or built for another model/layout."""


@dataclass
class TrainedCVAE:
    model: CVAE
    normalizer: TensorNormalizer
    info: dict  # training provenance (steps, final loss, conditioning), recorded in the manifest


@dataclass
class Store:
    path: Path
    manifest: dict
    layout: LoRALayout
    lora_config: LoRAConfig
    bank: ExpertBank
    cvae: TrainedCVAE | None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def base_model(self) -> dict:
        return self.manifest["base_model"]

    def base_pretrained(self) -> str | None:
        """What to pass to `load_backbone`: a tag, an absolute path to the bundled file, or None."""
        pretrained = self.base_model.get("pretrained")
        if pretrained == BASE_WEIGHTS_FILE:
            return str(self.path / BASE_WEIGHTS_FILE)
        return pretrained


# -------------------------------------------------------------------------------------------- writing


def write_store(
    path: Path,
    *,
    base_model: dict,
    lora_config: LoRAConfig,
    layout: LoRALayout,
    bank: ExpertBank,
    experts: list[dict],
    index_factory: str,
    cvae: TrainedCVAE | None = None,
    base_weights_file: Path | None = None,
) -> str:
    """Write a complete store atomically (temp dir + rename); returns its version (a content hash)."""
    if list(bank.ids) != [e["id"] for e in experts]:
        raise StoreError("expert records and library rows are not in the same order")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({"mu": bank.mu.contiguous(), "var": bank.var.contiguous(),
                   "embeddings": torch.from_numpy(np.ascontiguousarray(bank.embeddings))},
                  str(tmp / "library.safetensors"))
        faiss.write_index(bank.index, str(tmp / "index.faiss"))
        cvae_record = None
        if cvae is not None:
            tensors = {f"model.{k}": v.contiguous() for k, v in cvae.model.state_dict().items()}
            tensors |= cvae.normalizer.to_tensors()  # keys "normalizer.*"
            save_file(tensors, str(tmp / "cvae.safetensors"))
            cvae_record = {"config": cvae.model.config.to_dict(), "info": cvae.info}
        if base_weights_file is not None:
            shutil.copyfile(base_weights_file, tmp / BASE_WEIGHTS_FILE)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12],
            "created_unix": int(time.time()),
            "base_model": base_model,
            "lora": lora_config.to_dict(),
            "layout": layout.to_manifest(),
            "experts": experts,
            "index": {"factory": index_factory, "dim": int(bank.embeddings.shape[1]), "metric": "inner_product"},
            "cvae": cvae_record,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest["version"]


def _replace_dir(new: Path, target: Path) -> None:
    # rename() cannot replace a non-empty directory, so move the old store aside first; a reader sees either
    # the old store or the new one at `target`, except for the instant between the two renames.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------- reading


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise StoreError(f"no model store at {path}: {manifest_path.name} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{manifest_path} is not valid JSON: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and hashes to what was written: catches truncation and edits."""
    for name, digest in manifest["files"].items():
        file = Path(path) / name
        if not file.is_file():
            raise StoreError(f"{path}: {name} is missing")
        actual = file_sha256(file)
        if actual != digest:
            raise StoreError(f"{path}: {name} is corrupt or was edited (sha256 {actual[:12]}, manifest {digest[:12]})")


def load_store(path: Path, expected_layout: LoRALayout | None = None, expected_weights_id: str | None = None) -> Store:
    """Load and verify a store. `expected_*` describe the model it will serve; a mismatch raises StoreError."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:
        layout = LoRALayout.from_manifest(manifest["layout"])
        if expected_layout is not None:
            check_layout(expected_layout, layout)
    except LayoutMismatchError as e:
        raise StoreError(f"{path}: {e}") from e
    if expected_weights_id is not None and manifest["base_model"]["weights_id"] != expected_weights_id:
        raise StoreError(f"{path}: built on base weights {manifest['base_model']['weights_id']}, "
                         f"but the model loaded has {expected_weights_id}")
    try:
        library = load_file(str(path / "library.safetensors"))
        index = faiss.read_index(str(path / "index.faiss"))
    except (SafetensorError, RuntimeError) as e:
        raise StoreError(f"{path}: cannot read library: {e}") from e
    if library["mu"].shape[1] != layout.D:
        raise StoreError(f"{path}: library vectors have D={library['mu'].shape[1]}, layout says {layout.D}")
    experts = manifest["experts"]
    bank = ExpertBank(ids=[e["id"] for e in experts], descriptions=[e["description"] for e in experts],
                      mu=library["mu"], var=library["var"], embeddings=library["embeddings"].numpy(), index=index)
    return Store(path, manifest, layout, LoRAConfig.from_dict(manifest["lora"]), bank, _load_cvae(path, manifest))


def _load_cvae(path: Path, manifest: dict) -> TrainedCVAE | None:
    record = manifest.get("cvae")
    if record is None:
        return None
    tensors = load_file(str(path / "cvae.safetensors"))
    model = CVAE(CVAEConfig.from_dict(record["config"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    normalizer = TensorNormalizer.from_tensors(tensors)
    return TrainedCVAE(model.eval(), normalizer, record.get("info", {}))
