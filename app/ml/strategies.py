"""Ways to turn a description embedding into LoRA adapters, behind one interface.

    zero_shot     no adapter (a zero vector: B = 0 leaves the model untouched)
    model_soup    uniform average over every expert in the library
    adapter_soup  uniform average over the top-K experts
    topk_weighted softmax(cos/τ)-weighted average over the top-K experts: µ*
    sglora        SG-LoRA: sample the CVAE's semantic prior p(z|c), c = {µ*, σ*²}, and decode
    sglora_mean   SG-LoRA with z = the prior's mean: deterministic

All return vectors in the flat layout of the store, de-normalised, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch

from app.ml.aggregator import AggregationTrace, SemanticPrior, aggregate_experts, route, uniform_prior
from app.ml.store import Store


@dataclass
class Generation:
    strategy: str
    vectors: torch.Tensor  # [num_samples, D]
    trace: AggregationTrace | None


@dataclass(frozen=True)
class GenerationRequest:
    query: np.ndarray  # [e] normalised text embedding of the description (base model)
    k: int = 4
    tau: float = 0.05
    seed: int = 0
    num_samples: int = 1
    exclude: Collection[str] = ()  # expert ids left out of routing (leave-self-out, coverage ablations)


def _repeat(prior: SemanticPrior, n: int) -> torch.Tensor:
    return prior.mu[None].expand(n, -1).clone()


def _zero_shot(store: Store, req: GenerationRequest) -> Generation:
    return Generation("zero_shot", torch.zeros(req.num_samples, store.layout.D), None)


def _model_soup(store: Store, req: GenerationRequest) -> Generation:
    keep = [i for i, e in enumerate(store.bank.ids) if e not in set(req.exclude)]
    prior = uniform_prior(store.bank, keep, query=req.query)
    return Generation("model_soup", _repeat(prior, req.num_samples), prior.trace)


def _adapter_soup(store: Store, req: GenerationRequest) -> Generation:
    rows, _ = route(store.bank, req.query, req.k, exclude=req.exclude)
    prior = uniform_prior(store.bank, rows, query=req.query)
    return Generation("adapter_soup", _repeat(prior, req.num_samples), prior.trace)


def _topk_weighted(store: Store, req: GenerationRequest) -> Generation:
    prior = aggregate_experts(store.bank, req.query, req.k, req.tau, exclude=req.exclude)
    return Generation("topk_weighted", _repeat(prior, req.num_samples), prior.trace)


def _cvae(use_prior_mean: bool) -> Callable[[Store, GenerationRequest], Generation]:
    name = "sglora_mean" if use_prior_mean else "sglora"

    def generate(store: Store, req: GenerationRequest) -> Generation:
        if store.cvae is None:
            raise StrategyUnavailable(f"strategy {name!r} needs a CVAE, and store {store.version} has none")
        prior = aggregate_experts(store.bank, req.query, req.k, req.tau, exclude=req.exclude)
        norm, model = store.cvae.normalizer, store.cvae.model
        device = next(model.parameters()).device
        z_space = model.sample(norm.normalize(prior.mu).to(device), norm.normalize_var(prior.var).to(device),
                               num_samples=req.num_samples, seed=req.seed, use_prior_mean=use_prior_mean)
        return Generation(name, norm.denormalize(z_space.cpu()), prior.trace)

    return generate


class StrategyUnavailable(ValueError):
    """The strategy exists but this store cannot serve it (e.g. no CVAE)."""


STRATEGIES: dict[str, Callable[[Store, GenerationRequest], Generation]] = {
    "zero_shot": _zero_shot,
    "model_soup": _model_soup,
    "adapter_soup": _adapter_soup,
    "topk_weighted": _topk_weighted,
    "sglora": _cvae(use_prior_mean=False),
    "sglora_mean": _cvae(use_prior_mean=True),
}


@torch.no_grad()
def generate_adapters(store: Store, strategy: str, request: GenerationRequest) -> Generation:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if request.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {request.num_samples}")
    return STRATEGIES[strategy](store, request)
