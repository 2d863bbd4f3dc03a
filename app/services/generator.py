"""Description -> adapter file: generation parameters, the served safetensors format, and its parsing.

The file
--------
A safetensors file whose tensors are the LoRA factors under PEFT-style names, exactly the store's layout
entries, e.g. ``visual.transformer.resblocks.0.attn.q_proj.lora_A.weight`` [r, d] and ``...q_proj.lora_B.weight``
[d, r] (also k_proj, v_proj; the text tower under ``transformer.resblocks.*`` when the store adapts it). The
update to the fused ``in_proj_weight`` rows of projection p is ΔW_p = scale · B_p A_p, with ``scale`` in the
metadata. Metadata (all strings): format, base_model, base_pretrained, weights_id, layout_hash, store_version,
strategy, description, seed, k, tau, num_samples, sample_index, rank, alpha, scaling, scale, towers (JSON),
coverage (the description's best cosine to any library expert, app.ml.aggregator.coverage), gated (the gate's
reason, empty when it did not fire), trace (JSON: expert_ids, descriptions, similarities, weights, reasons, ...;
"null" for zero_shot and for a gated adapter, whose experts were not applied) and, on sample 0 of a multi-sample
request, sample_adapter_ids (JSON list of the other samples' ids).

The bytes are canonical (header keys sorted), so one adapter always has one byte string, and its
``adapter_id`` is the sha256 of the file: ``sha256sum <id>.safetensors`` verifies a download.

num_samples > 1
---------------
Each sample is its own adapter with its own id, downloadable from /adapters/{id}. /generate-lora returns sample
0 as the file (headers ``X-Adapter-Id`` and ``X-Sample-Adapter-Ids`` list all of them) or, with
``Accept: application/json``, every id in ``adapter_ids``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors

from app.core.errors import InvalidInput
from app.ml.canonical import canonical_safetensors
from app.ml.fewshot import Examples, Refinement
from app.ml.lora import LoRALayout, state_dict_to_vector, vector_to_state_dict
from app.ml.store import Store
from app.ml.strategies import Generation, default_strategy, validated_params
from app.services.cache import normalise_description
from app.services.engine import Engine

if TYPE_CHECKING:  # app.services.fewshot builds on /retrieve's image checks, which import this module
    from app.services.fewshot import FewShotRequest

ADAPTER_FORMAT = "sglora-adapter/1"


class InvalidAdapter(ValueError):
    """Bytes that are not an adapter file for the served model."""


@dataclass(frozen=True)
class GenerationParams:
    description: str  # normalised: what is embedded, recorded and keyed (CLIP's tokenizer lowercases anyway)
    strategy: str
    k: int
    tau: float
    seed: int
    num_samples: int
    gate: bool = True  # the store's confidence gate may replace the adapter by zero-shot (B = 0)
    fewshot: FewShotRequest | None = None  # examples to refine the adapter on (app/services/fewshot.py)

    @property
    def examples_key(self) -> str | None:
        return None if self.fewshot is None else self.fewshot.key


def served_default_strategy(settings, store: Store) -> str:
    """The strategy a request without one gets: SGLORA_DEFAULT_STRATEGY, else the store's validated default."""
    return settings.default_strategy or default_strategy(store)


def resolve_params(*, description: str, strategy: str | None, k: int | None, tau: float | None, seed: int,
                   num_samples: int, settings, store: Store, gate: bool = True,
                   fewshot: FewShotRequest | None = None) -> GenerationParams:
    """Apply defaults and the limits that depend on settings or the loaded library (schema checks the rest).

    Defaults, in order: the request, the settings, the store's validated choice (app/ml/routing.py)."""
    library_size = len(store.bank)
    text = description.strip()
    if not text:
        raise InvalidInput("description is empty", "description")
    if len(text) > settings.max_description_chars:
        raise InvalidInput(f"description has {len(text)} characters; the limit is {settings.max_description_chars}",
                           "description")
    strategy = strategy or served_default_strategy(settings, store)
    if k is None and settings.k is not None:
        k = min(settings.k, library_size)
    validated_k, validated_tau = validated_params(store, strategy)
    k = min(validated_k, library_size) if k is None else k
    if k > library_size:
        raise InvalidInput(f"k={k} exceeds the library size: {library_size} experts", "k")
    if num_samples > settings.max_num_samples:
        raise InvalidInput(f"num_samples={num_samples} exceeds the limit of {settings.max_num_samples}", "num_samples")
    if fewshot is not None and num_samples != 1:
        raise InvalidInput(f"num_samples={num_samples} with examples: refinement makes one adapter", "num_samples")
    tau = (settings.tau if settings.tau is not None else validated_tau) if tau is None else float(tau)
    return GenerationParams(normalise_description(text), strategy, k, tau, seed, num_samples, gate, fewshot)


# ------------------------------------------------------------------------------------------- the file


def read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise InvalidAdapter("too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 * 1024 * 1024:
        raise InvalidAdapter("safetensors header length is out of range")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"safetensors header is not JSON: {e}") from e
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise InvalidAdapter("safetensors file has no metadata")
    return metadata


def adapter_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class AdapterFile:
    adapter_id: str
    data: bytes
    metadata: dict[str, str]
    vector: torch.Tensor | None = field(default=None, repr=False)

    @property
    def trace(self) -> dict | None:
        return json.loads(self.metadata.get("trace", "null"))

    @property
    def gated(self) -> str | None:
        """Why the confidence gate replaced this adapter by zero-shot (None: it did not)."""
        return self.metadata.get("gated") or None

    @property
    def refinement(self) -> dict | None:
        """What few-shot examples did to this adapter (None: made from the description alone)."""
        return json.loads(self.metadata["refinement"]) if "refinement" in self.metadata else None

    @property
    def coverage(self) -> float | None:
        """The description's best cosine to any library expert (None: a file made before it was recorded)."""
        value = self.metadata.get("coverage")
        return float(value) if value else None

    @property
    def served(self) -> str:
        """Whose adapter this is: the strategy's (refined on examples or not), or zero_shot when the gate fell
        back and no examples refined it."""
        return "zero_shot" if self.gated and self.refinement is None else self.metadata.get("strategy", "")

    @property
    def adapter_ids(self) -> list[str]:
        """This adapter's id, then the other samples' of the same request."""
        return [self.adapter_id, *json.loads(self.metadata.get("sample_adapter_ids", "[]"))]


def parse_adapter(data: bytes, layout: LoRALayout, weights_id: str, store_version: str | None = None) -> AdapterFile:
    """Bytes -> AdapterFile, checked: a safetensors file of our format, made for this layout and base weights
    (and, when given, this store version), with every tensor the layout needs. Raises InvalidAdapter."""
    metadata = read_metadata(data)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise InvalidAdapter(f"format {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if metadata.get("layout_hash") != layout.hash:
        raise InvalidAdapter(f"made for layout {metadata.get('layout_hash')}, the model serves {layout.hash}")
    if metadata.get("weights_id") != weights_id:
        raise InvalidAdapter(f"made for base weights {metadata.get('weights_id')}, the model serves {weights_id}")
    if store_version is not None and metadata.get("store_version") != store_version:
        raise InvalidAdapter(f"made by store {metadata.get('store_version')}, serving {store_version}")
    try:
        vector = state_dict_to_vector(layout, load_safetensors(data))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled data
        raise InvalidAdapter(f"tensors do not load: {e}") from e
    if not torch.isfinite(vector).all():
        raise InvalidAdapter("adapter holds non-finite values")
    return AdapterFile(adapter_id_of(data), data, metadata, vector)


def build_files(engine: Engine, params: GenerationParams, generation: Generation,
                store: Store | None = None, refinement: Refinement | None = None) -> list[AdapterFile]:
    """One file per sample; sample 0 first, its metadata naming the others. `store`: the version generated on.
    With a few-shot `refinement`, its adapter is served and the metadata records the examples' count and hash
    (never the data) and what the refinement did."""
    store, layout = store if store is not None else engine.store, engine.layout
    lora = store.lora_config
    # A gated adapter is the zero adapter: its routed experts were not applied, so no weights are recorded (unless
    # examples refined it: the refinement starts from the routed candidates).
    applied = not generation.gated or refinement is not None
    trace = generation.trace.to_dict() if generation.trace is not None and applied else None
    common = {
        "format": ADAPTER_FORMAT,
        "base_model": store.base_model["name"],
        "base_pretrained": str(store.base_model.get("pretrained")),
        "weights_id": engine.backbone.weights_id,
        "layout_hash": layout.hash,
        "store_version": store.version,
        "strategy": generation.strategy,
        "description": params.description,
        "seed": str(params.seed),
        "k": str(params.k),
        "tau": repr(params.tau),
        "num_samples": str(params.num_samples),
        "rank": str(lora.rank),
        "alpha": repr(lora.alpha),
        "scaling": lora.scaling,
        "scale": repr(lora.scale),
        "towers": json.dumps(list(lora.towers)),
        "trace": json.dumps(trace),
        "gated": generation.gated or "",
        "coverage": "" if generation.coverage is None else repr(generation.coverage),
    }
    if refinement is not None:
        common |= {"examples": str(params.fewshot.count), "examples_sha256": params.fewshot.sha256,
                   "refinement": json.dumps(refinement.to_dict())}
        generation.vectors = refinement.vector[None]

    def make(i: int, extra: dict[str, str]) -> AdapterFile:
        vector = generation.vectors[i].detach().float().cpu().contiguous()
        data = canonical_safetensors(vector_to_state_dict(layout, vector), common | {"sample_index": str(i)} | extra)
        return AdapterFile(adapter_id_of(data), data, common | {"sample_index": str(i)} | extra, vector)

    others = [make(i, {}) for i in range(1, generation.vectors.shape[0])]
    extra = {"sample_adapter_ids": json.dumps([f.adapter_id for f in others])} if others else {}
    return [make(0, extra), *others]


def generate_files(engine: Engine, params: GenerationParams, query=None,
                   store: Store | None = None, examples: Examples | None = None) -> list[AdapterFile]:
    """Blocking: route with the base model (or the given routing `query` [e]), generate, serialise. Call from a
    worker thread. `store`: the version the request started on, so a live switch while it runs cannot mix two
    versions in one answer (default: the one served now). `examples` (decoded params.fewshot): refine on them."""
    store = store if store is not None else engine.store
    query = engine.describe(params.description) if query is None else query
    generation = engine.generate(params.description, params.strategy, params.k, params.tau, params.seed,
                                 params.num_samples, query=query, store=store, gate=params.gate)
    refinement = None
    if examples is not None:
        refinement = engine.refine(store, params.strategy, query, generation.vectors[0], examples,
                                   params.fewshot.config)
    return build_files(engine, params, generation, store, refinement)
