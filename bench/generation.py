"""Adapter generation latency per strategy, against the zero_shot baseline, on a built model store.

Two timings per strategy:
    generate    `generate_adapters` alone, the description already embedded (routing, aggregation, CVAE sampling)
    end-to-end  embed the description with the frozen base text tower, then generate: what a cache miss on
                POST /generate-lora costs before serialisation. zero_shot's end-to-end time is the embedding alone,
                so "x zero_shot" says how much each strategy adds to the unavoidable part of a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from app.ml.backbone import load_backbone, resolve_device
from app.ml.store import load_store
from app.ml.strategies import STRATEGIES, GenerationRequest, StrategyUnavailable, generate_adapters
from bench.timing import format_table, time_interleaved

DEFAULT_STORE = Path("model_store/tiny")  # where `make serve` builds the demo store
DESCRIPTION = "a photo of a red circle"


def run(
    store_path: str | Path = DEFAULT_STORE,
    device: str = "cpu",
    repeats: int = 31,
    k: int = 4,
    tau: float = 0.05,
    num_samples: int = 1,
    description: str = DESCRIPTION,
) -> list[dict]:
    torch_device = resolve_device(device)
    store = load_store(Path(store_path))
    if store.cvae is not None:
        store.cvae.model.to(torch_device)
    backbone = load_backbone(store.base_model["name"], store.base_pretrained(), str(torch_device))
    if not 1 <= k <= len(store.bank):
        raise ValueError(f"k={k} is out of range for a library of {len(store.bank)} experts")

    @torch.inference_mode()
    def embed() -> object:
        return backbone.encode_text([description])[0].cpu().numpy()

    query = embed()
    strategies = []
    for name in STRATEGIES:
        try:
            generate_adapters(store, name, GenerationRequest(query=query, k=k, tau=tau, num_samples=num_samples))
        except StrategyUnavailable:
            continue  # e.g. the CVAE strategies on a store built without one
        strategies.append(name)

    candidates = {}
    for name in strategies:
        request = GenerationRequest(query=query, k=k, tau=tau, num_samples=num_samples)
        candidates[f"{name}/generate"] = lambda name=name, request=request: generate_adapters(store, name, request)
        candidates[f"{name}/e2e"] = lambda name=name: generate_adapters(
            store, name, GenerationRequest(query=embed(), k=k, tau=tau, num_samples=num_samples)
        )
    seconds = time_interleaved(candidates, torch_device, repeats=repeats, warmup=2, min_time_s=0.01)
    base_gen, base_e2e = seconds["zero_shot/generate"], seconds["zero_shot/e2e"]
    return [
        {
            "store": str(store_path),
            "model": store.base_model["name"],
            "D": store.layout.D,
            "experts": len(store.bank),
            "device": torch_device.type,
            "strategy": name,
            "k": k,
            "num_samples": num_samples,
            "generate_ms": 1e3 * seconds[f"{name}/generate"],
            "generate_minus_zero_ms": 1e3 * (seconds[f"{name}/generate"] - base_gen),
            "e2e_ms": 1e3 * seconds[f"{name}/e2e"],
            "ratio": seconds[f"{name}/e2e"] / base_e2e,
        }
        for name in strategies
    ]


def table(rows: Sequence[dict]) -> str:
    if not rows:
        return "generation: no rows"
    r0 = rows[0]
    title = (
        f"(b) adapter generation, store {r0['store']} ({r0['model']}, D={r0['D']:,}, {r0['experts']} experts), "
        f"{r0['device']}, k={r0['k']}, num_samples={r0['num_samples']}; "
        f"x zero_shot = end-to-end (embed description + generate) / zero_shot end-to-end"
    )
    columns = [("strategy", "strategy"), ("generate_ms", "generate ms"),
               ("generate_minus_zero_ms", "- zero_shot ms"), ("e2e_ms", "end-to-end ms"), ("ratio", "x zero_shot")]
    return format_table(rows, columns, title)
