"""Apply a served adapter file to an open_clip model: the light loader for users of the adapters.

Imports torch, open_clip and safetensors only (never FastAPI, Redis, faiss or matplotlib), so

    from app.ml.adapter_loader import load_adapted_model
    backbone = load_adapted_model("adapter.safetensors", pretrained="model_store/tiny/base_weights.safetensors")

works wherever open_clip does. The file's metadata (base model, rank, alpha, scaling, towers, layout hash,
base-weights id) says how to rebuild the store's layout; a file that does not fit the model raises
LayoutMismatchError naming what differs.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from torch import nn

from app.ml.backbone import Backbone, load_backbone, weights_id
from app.ml.lora import (
    LayoutMismatchError,
    LoRAConfig,
    LoRALayout,
    inject_lora,
    layout_from_model,
    lora_modules,
    merge_lora,
    state_dict_to_vector,
    vector_to_lora,
)


def read_adapter(adapter: str | os.PathLike | bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file, from a path or the bytes of a download."""
    if isinstance(adapter, bytes):
        # safetensors reads metadata from files only; its header is 8 bytes of length, then JSON.
        (n,) = struct.unpack("<Q", adapter[:8])
        return load_bytes(adapter), dict(json.loads(adapter[8 : 8 + n]).get("__metadata__") or {})
    with safe_open(os.fspath(adapter), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(os.fspath(adapter)), metadata


def lora_config_of(metadata: dict[str, str]) -> LoRAConfig:
    try:
        return LoRAConfig(rank=int(metadata["rank"]), alpha=float(metadata["alpha"]), scaling=metadata["scaling"],
                          towers=tuple(json.loads(metadata["towers"])))
    except KeyError as e:
        raise LayoutMismatchError(f"adapter metadata lacks {e.args[0]!r}: not a file served by sglora") from None


def apply_adapter(model: nn.Module, adapter: str | os.PathLike | bytes, merge: bool = False) -> LoRALayout:
    """Load the adapter into an open_clip CLIP (LoRA wrappers injected if the model has none yet).

    merge=True folds ΔW into the weights (fastest forward; the model then computes the adapted CLIP only).
    Returns the layout; raises LayoutMismatchError when the file was made for another model or layout.
    """
    tensors, metadata = read_adapter(adapter)
    config = lora_config_of(metadata)
    if not getattr(model, "sglora_model_name", None) and metadata.get("base_model"):
        model.sglora_model_name = metadata["base_model"]  # a model from open_clip.create_model carries no name
    if lora_modules(model):
        layout = model.sglora_layout
    else:
        expected = layout_from_model(model, config)  # check before touching the model
        if metadata.get("layout_hash") not in (None, expected.hash):
            raise LayoutMismatchError(f"adapter made for layout {metadata['layout_hash']} ({metadata.get('base_model')}"
                                      f", r={config.rank}, towers={list(config.towers)}); this model's is "
                                      f"{expected.hash}")
        layout = inject_lora(model, config)
    vector_to_lora(model, state_dict_to_vector(layout, tensors))
    if merge:
        merge_lora(model)
    return layout


def load_adapted_model(adapter: str | os.PathLike | bytes, pretrained: str | None, device: str = "cpu",
                       merge: bool = False) -> Backbone:
    """Create the adapter's base model by name with `pretrained` weights (the store's base weights file or
    open_clip tag) and apply the adapter. Refuses other base weights than the adapter was made for."""
    _, metadata = read_adapter(adapter)
    expected = metadata.get("weights_id")
    if expected is not None and weights_id(pretrained) != expected:
        raise LayoutMismatchError(f"adapter made for base weights {expected}, got {weights_id(pretrained)} "
                                  f"from pretrained={pretrained!r}")
    backbone = load_backbone(metadata["base_model"], pretrained=pretrained, device=device)
    apply_adapter(backbone.model, adapter, merge=merge)
    return backbone
