"""Collect trained experts into a model store: library tensors, FAISS index over d_e, manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from app.ml.aggregator import ExpertBank, build_index
from app.ml.lora import LoRAConfig, LoRALayout
from app.ml.routing_index import choose_index
from app.ml.store import StoreError, TrainedCVAE, write_store
from offline.data import Task
from offline.train_experts import expert_path, read_expert


def load_bank(experts_dir: Path, tasks: Sequence[Task], layout: LoRALayout, index_factory: str):
    """(ExpertBank, expert records) for `tasks`, in task order; every expert must fit `layout`."""
    mus, variances, embeddings, records = [], [], [], []
    for task in tasks:
        path = expert_path(experts_dir, task.name)
        if not path.exists():
            raise StoreError(f"expert {task.name!r} has not been trained yet ({path} is missing)")
        tensors, meta = read_expert(path)
        if meta["provenance"]["layout_hash"] != layout.hash:
            raise StoreError(f"expert {task.name!r} was trained with layout {meta['provenance']['layout_hash']}, "
                             f"this build uses {layout.hash}: delete {experts_dir} or use another --out")
        mus.append(tensors["mu"])
        variances.append(tensors["var"])
        embeddings.append(tensors["embedding"])
        records.append({"id": task.name, "description": meta["description"], "provenance": meta["provenance"]})
    emb = torch.stack(embeddings).numpy()
    bank = ExpertBank(ids=[r["id"] for r in records], descriptions=[r["description"] for r in records],
                      mu=torch.stack(mus), var=torch.stack(variances), embeddings=emb,
                      index=build_index(emb, choose_index(len(emb), index_factory).factory))
    return bank, records


def build_library(
    store_path: Path,
    experts_dir: Path,
    tasks: Sequence[Task],
    *,
    base_model: dict,
    lora_config: LoRAConfig,
    layout: LoRALayout,
    index_factory: str = "Flat",
    cvae: TrainedCVAE | None = None,
    base_weights_file: Path | None = None,
    dtype: str = "float32",
    artifacts: dict | None = None,
    build: dict | None = None,
) -> str:
    bank, records = load_bank(experts_dir, tasks, layout, index_factory)
    return write_store(store_path, base_model=base_model, lora_config=lora_config, layout=layout, bank=bank,
                       experts=records, index_factory=index_factory, cvae=cvae, base_weights_file=base_weights_file,
                       dtype=dtype, artifacts=artifacts, build=build)
