"""The engine: the loaded model store, backbone with LoRA wrappers, and CVAE, held once per process.

All methods here are blocking torch work; services call them in the admission pool (`app.services.admission`).
Nothing a request does modifies shared weights: adapters travel per sample in a context variable
(`app.ml.lora.per_sample_lora`), so concurrent requests with different adapters share the model safely (DESIGN
decision 6).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from app.core.heap import freeze_loaded_objects
from app.ml.aggregator import route
from app.ml.backbone import Backbone, load_backbone
from app.ml.fewshot import Examples, FewShotConfig, Refinement, refine_routed
from app.ml.lora import LoRALayout, check_layout, inject_lora
from app.ml.retrieval import embed_descriptions, embed_mixed, embed_pairs
from app.ml.store import Store, StoreError, current_version, load_store, routing_record
from app.ml.strategies import Generation, GenerationRequest, default_strategy, generate_adapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranking:
    """Per image, the texts ranked; per text, the images ranked (indices and cosine scores, best first)."""

    image_to_text: list[list[tuple[int, float]]]
    text_to_image: list[list[tuple[int, float]]]


def rank(sim: torch.Tensor, top_k: int) -> list[list[tuple[int, float]]]:
    """sim [N, M] -> for each row the top_k columns by score, descending; ties by lower index (stable)."""
    scores, order = torch.sort(sim, dim=1, descending=True, stable=True)
    k = min(top_k, sim.shape[1])
    return [[(int(j), float(s)) for j, s in zip(o[:k].tolist(), sc[:k].tolist(), strict=True)]
            for o, sc in zip(order, scores, strict=True)]


class Engine:
    def __init__(self, store_path, device: str = "auto"):
        self.store_path, self.device_name = store_path, device
        self.store: Store | None = None
        self.backbone: Backbone | None = None
        self.layout: LoRALayout | None = None
        self.ready = False
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.reloads = 0

    # ------------------------------------------------------------------------------------------- loading

    def load(self) -> None:
        """Load store + backbone, check they belong together, warm up. Raises StoreError on a mismatch."""
        with self._lock:
            if self.ready:
                return
            t0 = time.perf_counter()
            try:
                store = load_store(self.store_path, mmap_library=True)
                backbone = load_backbone(store.base_model["name"], store.base_pretrained(), self.device_name)
                layout = inject_lora(backbone.model, store.lora_config)
                try:
                    check_layout(store.layout, layout)
                except ValueError as e:
                    raise StoreError(f"{self.store_path}: {e}") from e
                if store.base_model["weights_id"] != backbone.weights_id:
                    raise StoreError(f"{self.store_path}: built on base weights {store.base_model['weights_id']}, "
                                     f"but the model loaded has {backbone.weights_id}")
                if store.cvae is not None:
                    store.cvae.model.to(backbone.device)
                self.store, self.backbone, self.layout = store, backbone, layout
                self._warm_up(store)
            except Exception as e:
                self.load_error = f"{type(e).__name__}: {e}"  # for the log: it may name server paths
                raise
            freeze_loaded_objects()  # full collections then skip the loaded model (app/core/heap.py)
            self.load_seconds = time.perf_counter() - t0
            self.ready = True
            logger.info("engine ready: store %s (%d experts, D=%d) on %s in %.1fs", store.version, len(store.bank),
                        layout.D, backbone.device, self.load_seconds)

    def _warm_up(self, store: Store) -> None:
        """One forward through every path a request takes (routing, generation, per-sample LoRA on both towers)."""
        query = self.describe("a photo")
        gen = generate_adapters(store, "topk_weighted", GenerationRequest(query, k=1, tau=1.0))
        if store.cvae is not None:
            generate_adapters(store, "sglora_mean", GenerationRequest(query, k=1, tau=1.0))
        generate_adapters(store, default_strategy(store), GenerationRequest(query, k=1, tau=1.0))
        size = self.backbone.image_size
        image = Image.new("RGB", (size, size), (127, 127, 127))
        embed_pairs(self.backbone, self.layout, gen.vectors[0], [image], ["a photo"])
        embed_pairs(self.backbone, self.layout, None, [image], ["a photo"])

    @property
    def state(self) -> str:
        """"ready" | "loading" | "failed"."""
        return "ready" if self.ready else ("failed" if self.load_error else "loading")

    @property
    def public_detail(self) -> str:
        """What clients may read about the load state: no paths, no exception text (those go to the log)."""
        if self.load_error:
            return f"the model failed to load ({self.load_error.split(':', 1)[0]}); see the server log"
        return "the model is loading" if not self.ready else "ready"

    # ------------------------------------------------------------------------------------------ live updates

    def reload(self) -> dict:
        """Switch to the version the store's manifest names now, if it differs from the one served.

        The new version is loaded, checked against the loaded base model and warmed up while the old one keeps
        serving; then one reference is swapped. A request holds the `Store` it started with (`self.store` read
        once), so requests in flight finish on their version. A version that fails to load leaves the served
        one in place and raises StoreError naming the problem. Used by POST /admin/reload and the watcher;
        replicas can call it (or `reload_if_changed`) themselves.
        """
        if not self.ready:
            raise StoreError("the engine is still loading; nothing to reload yet")
        with self._reload_lock:
            old = self.store
            target = current_version(self.store_path)
            if target == old.version:
                return {"changed": False, "version": old.version, "previous_version": old.version}
            t0 = time.perf_counter()
            store = load_store(self.store_path, expected_layout=self.layout,
                               expected_weights_id=self.backbone.weights_id, mmap_library=True)
            if store.base_model["name"] != old.base_model["name"]:
                raise StoreError(f"{self.store_path}: version {store.version} is for base model "
                                 f"{store.base_model['name']}, serving {old.base_model['name']}: restart to switch")
            if store.cvae is not None:
                store.cvae.model.to(self.backbone.device)
            self._warm_up(store)
            self.store = store  # one reference assignment: atomic for readers
            self.reloads += 1
            freeze_loaded_objects()  # the new store out of the collector's reach (requests on `old` still run)
            seconds = time.perf_counter() - t0
            logger.info("store switched %s -> %s (%d experts) in %.2fs", old.version, store.version, len(store.bank),
                        seconds)
            return {"changed": True, "version": store.version, "previous_version": old.version,
                    "experts": len(store.bank), "seconds": seconds}

    def reload_if_changed(self) -> dict | None:
        """For a watcher: reload when the version pointer moved; None (and a log line) when that fails."""
        try:
            return self.reload()
        except StoreError as e:
            logger.error("store reload failed, still serving %s: %s", self.version, e)
            return None

    # ------------------------------------------------------------------------------------------ requests

    @property
    def library_size(self) -> int:
        return len(self.store.bank)

    @property
    def version(self) -> str:
        return self.store.version

    def describe(self, description: str) -> np.ndarray:
        """Routing query: the description's embedding by the FROZEN base model (never an attached adapter)."""
        return embed_descriptions(self.backbone, [description])[0].cpu().numpy().astype(np.float32)

    def generate(self, description: str, strategy: str, k: int, tau: float, seed: int, num_samples: int,
                 query: np.ndarray | None = None, store: Store | None = None, gate: bool = True) -> Generation:
        """`query`: the description's routing embedding when the caller has it already (micro-batched).
        `store`: the version the request started on (default: the one served now)."""
        query = self.describe(description) if query is None else query
        store = store if store is not None else self.store
        return generate_adapters(store, strategy, GenerationRequest(query, k, tau, seed, num_samples, gate=gate))

    def refine(self, store: Store, strategy: str, query: np.ndarray, start_d: torch.Tensor, examples: Examples,
               config: FewShotConfig) -> Refinement:
        """Few-shot refinement of `start_d` over the candidates `strategy` routes `query` to (app/ml/fewshot.py).
        Per-sample adapters only: the shared model is not modified, concurrent requests are unaffected."""
        return refine_routed(store, self.backbone, self.layout, strategy, GenerationRequest(query), start_d,
                             examples, config)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> model input [3, H, W] on the CPU (the model's resize, crop and normalisation)."""
        return self.backbone.preprocess(image.convert("RGB"))

    def retrieve(self, adapter: torch.Tensor | None, images: Sequence[Image.Image] | torch.Tensor,
                 texts: Sequence[str], top_k: int) -> Ranking:
        """images: PIL images or preprocessed [N, 3, H, W]."""
        if isinstance(images, torch.Tensor):
            images = images.to(self.backbone.device)
        image_emb, text_emb = embed_pairs(self.backbone, self.layout, adapter, images, list(texts))
        return self.rank(image_emb, text_emb, top_k)

    @staticmethod
    def rank(image_emb: torch.Tensor, text_emb: torch.Tensor, top_k: int) -> Ranking:
        sim = (image_emb @ text_emb.T).float().cpu()  # [N images, T texts], cosine
        return Ranking(image_to_text=rank(sim, top_k), text_to_image=rank(sim.T, top_k))

    def embed_mixed(self, tower: str, inputs, bank: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
        """A micro-batch: sample n with adapter bank[index[n]] (see app.ml.retrieval.embed_mixed)."""
        return embed_mixed(self.backbone, self.layout, tower, inputs, bank, index)

    def experts_page(self, offset: int, limit: int, q: str | None = None) -> dict:
        """One page of the library, or with `q` the `limit` experts nearest q by the routing index (the
        similarities a request with that description would see). One store version throughout."""
        store = self.store
        records = store.manifest["experts"]
        if q is None:
            items = [_expert_item(e) for e in records[offset : offset + limit]]
        else:
            rows, sims = route(store.bank, self.describe(q), min(limit, len(store.bank)))
            items = [_expert_item(records[r]) | {"similarity": float(s)} for r, s in zip(rows, sims, strict=True)]
            offset = 0
        index = {k: store.manifest["index"].get(k) for k in ("factory", "search", "recall_at_4")}
        if index["recall_at_4"] is None and index["factory"] == "Flat":  # a format-1 store: exact, unrecorded
            index["recall_at_4"] = 1.0
        return {"store_version": store.version, "count": len(records), "offset": offset, "limit": limit, "q": q,
                "index": index, "experts": items, "cvae": store.cvae.info if store.cvae is not None else None,
                "routing": routing_record(store.manifest)}


def _expert_item(record: dict) -> dict:
    return {"id": record["id"], "description": record["description"], "provenance": record.get("provenance", {})}
