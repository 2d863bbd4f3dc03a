"""Grow or shrink a built store's expert library: `python -m offline add-experts / remove-experts`.

Sources `add-experts` takes (detected from what the path holds):
  peft     a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for a Hugging Face CLIPModel,
           q_proj/k_proj/v_proj of vision_model and/or text_model. Names and the scaling conversion are
           `app.ml.hf_clip`'s (one owner): B <- B * s_peft / s_store keeps ΔW = s·B·A exact.
  adapter  a safetensors adapter served by this service (/generate-lora, /adapters/{id}); its `scale` metadata is
           converted the same way.
  expert   an expert file from `train-experts` (<store>.work/experts/<task>.safetensors): mu and var are the
           moments of its kept checkpoints.

A single-checkpoint source (peft, adapter) is one point, not a distribution: its within-expert variance σ² is
0, so in a mixture it contributes only through the between-expert term Σα(µ_k − µ*)². That is stated in the
expert's provenance (`sigma2`: "zero: single checkpoint").

The expert id is the folder/file name (without .safetensors); its description comes from `--descriptions FILE`
(JSON {id: description}), else a sidecar (`<folder>/description.txt` or `<file>.description.txt`), else the
description in the file's own metadata. d_e is the description's embedding by the store's frozen base model.

Everything is checked before anything is written: wrong rank, width, tower, base model, or a duplicate id raise
IncompatibleSource naming expected and actual, and the store directory is left byte-identical.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from app.ml import hf_clip
from app.ml.backbone import Backbone, load_backbone
from app.ml.lora import LayoutMismatchError, LoRAConfig, LoRALayout, state_dict_to_vector
from app.ml.retrieval import embed_descriptions
from app.ml.store import NewExperts, Store, StoreError, load_store, update_store

SERVED_ADAPTER_FORMAT = "sglora-adapter/1"  # app.services.generator.ADAPTER_FORMAT (offline does not import services)


class IncompatibleSource(StoreError):
    """A source that does not fit the store; the message names expected and actual."""


@dataclass
class Imported:
    id: str
    description: str | None
    mu: torch.Tensor  # [D] in the store's layout and scale
    var: torch.Tensor  # [D]
    provenance: dict
    notes: list[str] = field(default_factory=list)  # accepted, but the user should know (printed by add-experts)


# ------------------------------------------------------------------------------------------------ sources


def read_peft(folder: Path, layout: LoRALayout, lora: LoRAConfig, base_hf_name: str | None) -> Imported:
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise IncompatibleSource(f"{folder}: a PEFT folder needs adapter_config.json and adapter_model.safetensors")
    peft_config = json.loads(config_path.read_text())
    state = load_file(str(weights_path))
    towers = sorted({tower for k in state for tower, block in hf_clip.HF_BLOCKS.items() if block in k})
    if towers != sorted(layout.towers):
        raise IncompatibleSource(f"{folder}: adapts towers {towers}, the store's layout adapts {list(layout.towers)}")
    peft_base = peft_config.get("base_model_name_or_path")
    if peft_base and peft_base != base_hf_name:
        raise IncompatibleSource(f"{folder}: made for base model {peft_base!r}, the store's base is "
                           f"{base_hf_name or 'a local open_clip model without a Hugging Face name'}")
    try:
        vector = hf_clip.peft_to_vector(state, peft_config, layout, lora)
    except (LayoutMismatchError, ValueError) as e:
        raise IncompatibleSource(f"{folder}: {e} (store: {_describe_layout(layout, lora)})") from e
    provenance = {"source": "peft", "path": str(folder), "peft_r": int(peft_config["r"]),
                  "peft_lora_alpha": peft_config.get("lora_alpha"), "use_rslora": bool(peft_config.get("use_rslora")),
                  "scale_ratio": hf_clip.peft_scale(peft_config) / lora.scale, "base_model_name_or_path": peft_base,
                  "sigma2": "zero: single checkpoint", "layout_hash": layout.hash}
    notes = []
    if int(peft_config["r"]) < layout.rank:
        notes.append(f"{folder.name}: rank r={peft_config['r']} zero-padded to the store's rank {layout.rank} (ΔW is "
                     f"unchanged; the padded rank is empty, so this expert adds a rank-{peft_config['r']} update)")
    return Imported(folder.name, None, vector, torch.zeros_like(vector), provenance, notes)


def _describe_layout(layout: LoRALayout, lora: LoRAConfig) -> str:
    widths = sorted({d for _, d in layout.blocks})
    return (f"{layout.model_name} r={layout.rank} towers={list(layout.towers)} widths={widths} "
            f"scale={lora.scale:g} ({lora.scaling})")


def read_served_adapter(file: Path, layout: LoRALayout, lora: LoRAConfig, weights_id: str) -> Imported:
    metadata = _metadata(file)
    checks = [("rank", str(layout.rank), metadata.get("rank")),
              ("towers", json.dumps(list(layout.towers)), metadata.get("towers")),
              ("base weights", weights_id, metadata.get("weights_id")),
              ("layout", layout.hash, metadata.get("layout_hash"))]
    for what, expected, actual in checks:
        if actual != expected:
            raise IncompatibleSource(f"{file}: {what} {actual}, the store expects {expected} "
                               f"(store: {_describe_layout(layout, lora)})")
    try:
        vector = state_dict_to_vector(layout, load_file(str(file)))
    except LayoutMismatchError as e:
        raise IncompatibleSource(f"{file}: {e}") from e
    ratio = float(metadata["scale"]) / lora.scale
    vector = _rescale_B(vector, layout, ratio)
    provenance = {"source": "adapter", "path": str(file), "adapter_store_version": metadata.get("store_version"),
                  "strategy": metadata.get("strategy"), "scale_ratio": ratio, "sigma2": "zero: single checkpoint",
                  "layout_hash": layout.hash}
    return Imported(file.name.removesuffix(".safetensors"), metadata.get("description"), vector,
                    torch.zeros_like(vector), provenance)


def _rescale_B(vector: torch.Tensor, layout: LoRALayout, ratio: float) -> torch.Tensor:
    """B <- B * ratio for every entry: ΔW = s·B·A stays the same when s changes by 1/ratio (A, the shared init
    direction, is left alone)."""
    out = vector.clone()
    for e in layout.entries:
        if ".lora_B." in e.name:
            out[e.offset : e.offset + e.numel] *= ratio
    return out


def read_trained_expert(file: Path, layout: LoRALayout) -> Imported:
    tensors, metadata = load_file(str(file)), _metadata(file)
    provenance = json.loads(metadata.get("provenance", "{}"))
    if provenance.get("layout_hash") != layout.hash:
        raise IncompatibleSource(f"{file}: trained for layout {provenance.get('layout_hash')}, the store's is "
                                 f"{layout.hash} ({layout.model_name} r={layout.rank} towers={list(layout.towers)})")
    checkpoints = tensors["checkpoints"].double()  # [M, D]
    if checkpoints.shape[1] != layout.D:
        raise IncompatibleSource(f"{file}: checkpoints have D={checkpoints.shape[1]}, the store's layout D={layout.D}")
    mu, var = checkpoints.mean(0).float(), checkpoints.var(0, unbiased=False).float()  # population, as trained
    provenance = provenance | {"source": "expert", "path": str(file), "checkpoints": int(checkpoints.shape[0]),
                               "sigma2": "checkpoints" if checkpoints.shape[0] > 1 else "zero: single checkpoint"}
    return Imported(metadata.get("name") or file.stem, metadata.get("description"), mu, var, provenance)


def _metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise IncompatibleSource(f"{file}: not a readable safetensors file: {e}") from e


def read_source(path: Path, store: Store) -> Imported:
    """Detect the kind of `path` and read it into the store's layout and scale."""
    layout, lora = store.layout, store.lora_config
    if path.is_dir():
        base_hf = hf_clip.hf_base_model_name(store.base_model["name"], store.base_model.get("pretrained"))
        return read_peft(path, layout, lora, base_hf)
    if not path.is_file():
        raise IncompatibleSource(f"{path}: no such file or folder")
    metadata = _metadata(path)
    if metadata.get("format") == SERVED_ADAPTER_FORMAT:
        return read_served_adapter(path, layout, lora, store.base_model["weights_id"])
    if "provenance" in metadata:
        return read_trained_expert(path, layout)
    raise IncompatibleSource(f"{path}: neither a PEFT folder, an adapter served by sglora, nor a train-experts expert")


def _description(source: Path, imported: Imported, descriptions: dict[str, str]) -> str:
    sidecar = source / "description.txt" if source.is_dir() else source.with_name(source.name + ".description.txt")
    text = descriptions.get(imported.id) or (sidecar.read_text().strip() if sidecar.is_file() else None)
    text = text or imported.description
    if not text or not text.strip():
        raise IncompatibleSource(f"{source}: no description for expert {imported.id!r}: give --descriptions FILE "
                           f"(JSON {{id: description}}) or write {sidecar}")
    return text.strip()


# ------------------------------------------------------------------------------------------------ commands


def add_experts(store_path: Path, sources: Sequence[Path], descriptions: dict[str, str] | None = None,
                backbone: Backbone | None = None) -> dict:
    """Read, check and embed every source, then append them as one new store version. Returns a summary."""
    store = load_store(store_path, mmap_library=True)
    descriptions = descriptions or {}
    imported = []
    for source in sources:
        item = read_source(Path(source), store)
        item.description = _description(Path(source), item, descriptions)
        imported.append(item)
    if backbone is None:
        backbone = load_backbone(store.base_model["name"], store.base_pretrained(), "cpu")
    if backbone.weights_id != store.base_model["weights_id"]:
        raise IncompatibleSource(f"the backbone given has weights {backbone.weights_id}, the store's base "
                           f"{store.base_model['weights_id']}")
    embeddings = embed_descriptions(backbone, [i.description for i in imported]).float().cpu().numpy()
    records = [{"id": i.id, "description": i.description, "provenance": i.provenance} for i in imported]
    new = NewExperts(records, torch.stack([i.mu for i in imported]), torch.stack([i.var for i in imported]),
                     embeddings)
    version = update_store(store_path, add=new, reason=f"experts added: {[r['id'] for r in records]}")
    notes = [note for i in imported for note in i.notes]
    return {"version": version, "previous_version": store.version, "added": [r["id"] for r in records],
            "experts": len(store.bank) + len(records)} | ({"notes": notes} if notes else {})


def remove_experts(store_path: Path, ids: Sequence[str]) -> dict:
    previous = load_store(store_path, mmap_library=True)
    version = update_store(store_path, remove=list(ids), reason=f"experts removed: {sorted(ids)}")
    return {"version": version, "previous_version": previous.version, "removed": list(ids),
            "experts": len(previous.bank) - len(ids)}
