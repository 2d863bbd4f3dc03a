"""A served adapter in the formats other tools load: the native file, a PEFT folder (zip) for Hugging Face
`CLIPModel`, or the store's open_clip base weights with the adapter merged (one safetensors file).

Names and scaling of the PEFT folder come from `app.ml.hf_clip` (the one owner of that mapping); the merge from
`app.ml.lora.merged_state_dict`. Blocking torch work: call from a worker thread.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Literal

from app.ml.canonical import canonical_safetensors
from app.ml.hf_clip import hf_base_model_name, peft_adapter_files
from app.ml.lora import merged_state_dict
from app.ml.store import BASE_WEIGHTS_FILE, Store
from app.services.engine import Engine
from app.services.generator import AdapterFile

ExportFormat = Literal["safetensors", "peft", "open_clip-merged"]
EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "peft", "open_clip-merged")
MERGED_FORMAT = "sglora-open_clip-merged/1"
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed member timestamps: one adapter, one zip byte string

_PEFT_README = """# sglora adapter {adapter_id} as a PEFT LoRA for Hugging Face CLIPModel

Base model: open_clip `{model}`, weights {weights_id}.
Task description: {description!r}; strategy {strategy}, seed {seed}.
Targets: q_proj/k_proj/v_proj of {towers}; r={rank}, lora_alpha={alpha}, use_rslora={rslora}.

## On the Hugging Face Hub base

{hub}

## On the store's own base weights, converted to a CLIPModel

Works for any store (needs the sglora package with its `hf` extra: `pip install -e '.[hf]'`, and the weights
{weights_hint}):

```python
import open_clip
from peft import PeftModel

from app.ml.backbone import load_backbone
from app.ml.hf_clip import to_hf_clip_model

open_clip_model = load_backbone("{model}", {pretrained}, device="cpu").model
base = to_hf_clip_model(open_clip_model, open_clip.get_model_config("{model}"))
model = PeftModel.from_pretrained(base, "<this folder>")
```
"""
_HUB_CODE = """```python
from peft import PeftModel
from transformers import CLIPModel

base = CLIPModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this folder>")
```"""
_NO_HUB = ("No Hugging Face checkpoint holds these base weights (`base_model_name_or_path` is null), so "
           "`CLIPModel.from_pretrained` cannot load the base: convert the store's weights as below.")


def peft_readme(adapter: AdapterFile, store: Store, base_hf_name: str | None) -> str:
    """The README.md of the PEFT folder: code that loads it, on the hub base (when one exists) and on the store's
    weights converted (always). `<this folder>` (and `<store>` for bundled weights) are the user's paths."""
    meta, lora = adapter.metadata, store.lora_config
    pretrained = store.base_model.get("pretrained")
    bundled = pretrained == BASE_WEIGHTS_FILE
    return _PEFT_README.format(
        adapter_id=adapter.adapter_id, model=store.base_model["name"], weights_id=meta.get("weights_id"),
        description=meta.get("description"), strategy=meta.get("strategy"), seed=meta.get("seed"),
        towers=" and ".join(lora.towers), rank=lora.rank, alpha=lora.alpha, rslora=lora.scaling == "rslora",
        hub=_HUB_CODE.format(base=base_hf_name) if base_hf_name else _NO_HUB,
        pretrained=f'"<store>/{BASE_WEIGHTS_FILE}"' if bundled else json.dumps(pretrained),
        weights_hint=(f"file `{BASE_WEIGHTS_FILE}` of the sglora store that served this adapter (`<store>`)"
                      if bundled else f"open_clip tag {pretrained!r}, downloaded by open_clip"),
    )


@dataclass(frozen=True)
class Export:
    data: bytes
    media_type: str
    filename: str


def export_adapter(engine: Engine, adapter: AdapterFile, fmt: str) -> Export:
    if fmt == "safetensors":
        return Export(adapter.data, "application/octet-stream", f"{adapter.adapter_id}.safetensors")
    if fmt == "peft":
        return Export(peft_zip(engine, adapter), "application/zip", f"{adapter.adapter_id}.peft.zip")
    if fmt == "open_clip-merged":
        return Export(merged_open_clip(engine, adapter), "application/octet-stream",
                      f"{adapter.adapter_id}.open_clip-merged.safetensors")
    raise ValueError(f"unknown export format {fmt!r}")  # the route's Literal rejects it first


def peft_zip(engine: Engine, adapter: AdapterFile) -> bytes:
    store = engine.store
    base = hf_base_model_name(store.base_model["name"], store.base_model.get("pretrained"))
    files = peft_adapter_files(engine.layout, store.lora_config, adapter.vector, base,
                               metadata={"sglora_adapter_id": adapter.adapter_id})
    files["README.md"] = peft_readme(adapter, store, base).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), files[name])
    return buffer.getvalue()


def merged_open_clip(engine: Engine, adapter: AdapterFile) -> bytes:
    """The whole base model (ViT-B/16: ~600 MB) with ΔW folded in; built per request, never cached, since it is
    derived from the adapter id and the base weights at any time."""
    store, meta = engine.store, adapter.metadata
    state = merged_state_dict(engine.backbone.model, adapter.vector)
    metadata = {"format": MERGED_FORMAT, "base_model": store.base_model["name"],
                "base_weights_id": engine.backbone.weights_id, "adapter_id": adapter.adapter_id,
                "description": meta.get("description", ""), "strategy": meta.get("strategy", ""),
                "trace": meta.get("trace", "null")}
    return canonical_safetensors({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def download_urls(base_url: str) -> dict[str, str]:
    """{format: URL} for a download URL of the native file."""
    return {fmt: base_url if fmt == "safetensors" else f"{base_url}?format={fmt}" for fmt in EXPORT_FORMATS}

