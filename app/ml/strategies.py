"""Ways to turn a description embedding into LoRA adapters, behind one interface.

    zero_shot        no adapter (a zero vector: B = 0 leaves the model untouched)
    model_soup       uniform average over every expert in the library
    adapter_soup     uniform average over the top-K experts by cosine
    topk_weighted    softmax(cos/τ)-weighted factor-space merge of the top-K by cosine: the paper's µ*
    delta_merge      the same experts and weights, merged in ΔW space and re-factorised by SVD (delta_merge.py)
    transfer_routed  top-K by the transfer router's predicted gain, softmax(gain/τ) weights, ΔW-space merge
    sglora           SG-LoRA: sample the CVAE's prior p(z|c), c = the prior it was trained on, and decode
    sglora_mean      SG-LoRA with z = the prior's mean: deterministic

K and τ default to what the store's validation chose for each strategy (app/ml/routing.py); τ is a temperature
on cosines for cosine routing and on predicted gains (mR@1 points) for transfer routing. With a gate in the
store, a request it does not trust gets the zero adapter and the reason, unless `gate=False`.

All return vectors in the flat layout of the store, de-normalised, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from app.ml.aggregator import (
    AggregationTrace,
    SemanticPrior,
    aggregate_experts,
    coverage,
    merge_prior,
    route,
    route_by_gain_index,
    softmax_weights,
    uniform_prior,
)
from app.ml.delta_merge import merge_delta_space
from app.ml.routing import FALLBACK_PARAMS
from app.ml.store import Store

DEFAULT_STRATEGY = "sglora"  # for stores whose validation has not chosen one


@dataclass
class Generation:
    strategy: str
    vectors: torch.Tensor  # [num_samples, D]
    trace: AggregationTrace | None
    gated: str | None = None  # the gate's reason when it replaced the strategy's adapter by zero-shot
    coverage: float | None = None  # aggregator.coverage of the request's description: set for every strategy


@dataclass(frozen=True)
class GenerationRequest:
    query: np.ndarray  # [e] normalised text embedding of the description (base model)
    k: int | None = None  # None: the store's validated K for the strategy
    tau: float | None = None  # None: the store's validated temperature for the strategy
    seed: int = 0
    num_samples: int = 1
    exclude: Collection[str] = ()  # expert ids left out of routing (leave-self-out, coverage ablations)
    gate: bool = True  # apply the store's confidence gate (zero-shot when no expert is predicted to help)


class StrategyUnavailable(ValueError):
    """The strategy exists but this store cannot serve it (e.g. no CVAE, no transfer router)."""


def validated_params(store: Store, strategy: str) -> tuple[int, float]:
    """(K, τ) the store's validation chose for `strategy` (the paper's K = 4, τ = 0.05 without validation)."""
    params = store.routing.params_for(strategy) if store.routing is not None else FALLBACK_PARAMS
    return int(params["k"]), float(params["tau"])


def resolved_params(store: Store, strategy: str, req: GenerationRequest) -> tuple[int, float]:
    """(K, τ): the request's where given, else the store's validated ones; K capped by the routable experts."""
    validated_k, validated_tau = validated_params(store, strategy)
    k = validated_k if req.k is None else req.k
    tau = validated_tau if req.tau is None else req.tau
    available = len(store.bank) - len(store.bank.rows_of(req.exclude))
    return (min(k, available) if req.k is None else k), tau


def _repeat(prior: SemanticPrior, n: int) -> torch.Tensor:
    return prior.mu[None].expand(n, -1).clone()


def _delta_merge_fn(store: Store):
    return partial(merge_delta_space, store.layout, store.lora_config.scale)


# ------------------------------------------------------------------------------------------ priors


def _prior_topk_weighted(store: Store, req: GenerationRequest, k: int, tau: float) -> SemanticPrior:
    return aggregate_experts(store.bank, req.query, k, tau, exclude=req.exclude)


def _prior_delta_merge(store: Store, req: GenerationRequest, k: int, tau: float) -> SemanticPrior:
    return aggregate_experts(store.bank, req.query, k, tau, exclude=req.exclude, merge=_delta_merge_fn(store))


def _prior_transfer_routed(store: Store, req: GenerationRequest, k: int, tau: float) -> SemanticPrior:
    gain_index = store.routing.gain_index(store.bank.embeddings) if store.routing else None
    if gain_index is None:
        raise StrategyUnavailable(f"strategy 'transfer_routed' (and a CVAE conditioned on it) needs a transfer router, "
                                  f"and store {store.version} has none: built before validation, or the library "
                                  "changed since (re-run `python -m offline validate` and `train-cvae`)")
    rows, gains_k, sims_k = route_by_gain_index(store.bank, gain_index, req.query, k, req.exclude)
    return merge_prior(store.bank, rows, softmax_weights(gains_k, tau), sims_k, _delta_merge_fn(store),
                       predicted_gains_k=gains_k)


PriorFn = Callable[[Store, GenerationRequest, int, float], SemanticPrior]
PRIORS: dict[str, PriorFn] = {
    "topk_weighted": _prior_topk_weighted,
    "delta_merge": _prior_delta_merge,
    "transfer_routed": _prior_transfer_routed,
}


# ------------------------------------------------------------------------------------------ strategies


def _zero_shot(store: Store, req: GenerationRequest) -> Generation:
    return Generation("zero_shot", torch.zeros(req.num_samples, store.layout.D), None)


def _model_soup(store: Store, req: GenerationRequest) -> Generation:
    keep = np.setdiff1d(np.arange(len(store.bank)), list(store.bank.rows_of(req.exclude)))  # every expert: O(E)
    prior = uniform_prior(store.bank, keep, query=req.query)
    return Generation("model_soup", _repeat(prior, req.num_samples), prior.trace)


def _adapter_soup(store: Store, req: GenerationRequest) -> Generation:
    rows, _ = route(store.bank, req.query, resolved_params(store, "adapter_soup", req)[0], exclude=req.exclude)
    prior = uniform_prior(store.bank, rows, query=req.query, routed_by="cosine")
    return Generation("adapter_soup", _repeat(prior, req.num_samples), prior.trace)


def _merged(name: str) -> Callable[[Store, GenerationRequest], Generation]:
    def generate(store: Store, req: GenerationRequest) -> Generation:
        prior = PRIORS[name](store, req, *resolved_params(store, name, req))
        return Generation(name, _repeat(prior, req.num_samples), prior.trace)

    return generate


def cvae_prior_name(store: Store) -> str:
    """The prior the store's CVAE conditions on (older stores: the paper's top-K merge). Trained on the transfer
    router's prior but the router is gone (the library changed since validation): the same ΔW merge of cosine-
    routed experts, so sglora keeps serving until `offline validate` + `train-cvae` run again."""
    prior = store.cvae.info.get("prior", "topk_weighted") if store.cvae is not None else "topk_weighted"
    if prior == "transfer_routed" and (store.routing is None or store.routing.router is None):
        return "delta_merge"
    return prior


def _cvae(use_prior_mean: bool) -> Callable[[Store, GenerationRequest], Generation]:
    name = "sglora_mean" if use_prior_mean else "sglora"

    def generate(store: Store, req: GenerationRequest) -> Generation:
        if store.cvae is None:
            raise StrategyUnavailable(f"strategy {name!r} needs a CVAE, and store {store.version} has none")
        prior_name = cvae_prior_name(store)
        prior = PRIORS[prior_name](store, req, *resolved_params(store, prior_name, req))
        norm, model = store.cvae.normalizer, store.cvae.model
        device = next(model.parameters()).device
        z_space = model.sample(norm.normalize(prior.mu).to(device), norm.normalize_var(prior.var).to(device),
                               num_samples=req.num_samples, seed=req.seed, use_prior_mean=use_prior_mean)
        return Generation(name, norm.denormalize(z_space.cpu()), prior.trace)

    return generate


STRATEGIES: dict[str, Callable[[Store, GenerationRequest], Generation]] = {
    "zero_shot": _zero_shot,
    "model_soup": _model_soup,
    "adapter_soup": _adapter_soup,
    "topk_weighted": _merged("topk_weighted"),
    "delta_merge": _merged("delta_merge"),
    "transfer_routed": _merged("transfer_routed"),
    "sglora": _cvae(use_prior_mean=False),
    "sglora_mean": _cvae(use_prior_mean=True),
}


def check_strategy(name: str) -> str:
    """The one check of a strategy name: settings, request schemas and the CLI call it."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return name


def default_strategy(store: Store) -> str:
    """The store's validated default (its validation ranked it first), else the paper's method when the store can
    serve it (a CVAE whose prior needs no validated router), else the paper's top-K merge."""
    if store.routing is not None:
        return store.routing.default_strategy
    return DEFAULT_STRATEGY if store.cvae is not None else "topk_weighted"


def gate_reason(store: Store, query: np.ndarray, exclude: Collection[str] = (),
                coverage_: float | None = None, best_gain: float | None = None) -> str | None:
    """Why the store's gate would not trust an adapter for `query` (None: it would, or the store has no gate).
    `coverage_`: the query's aggregator.coverage when the caller has it (the gate quotes that very number);
    `best_gain`: the highest predicted gain among the experts `exclude` leaves, when the caller routed by it."""
    routing = store.routing
    if routing is None or routing.gate is None:
        return None
    if coverage_ is None:
        coverage_ = coverage(store.bank, query, exclude)
    gain_index = routing.gain_index(store.bank.embeddings)
    if best_gain is None and gain_index is not None:
        # The best expert by predicted gain: an index search for one row, not E products.
        best_gain = float(route_by_gain_index(store.bank, gain_index, query, 1, exclude)[1][0])
    return routing.gate.check(coverage_, best_gain, routing.domain_distance(query))


def _best_predicted_gain(trace: AggregationTrace | None) -> float | None:
    """The top predicted gain a transfer-routed prior already found (its top-K holds the top-1), else None."""
    if trace is None or trace.routed_by != "predicted_gain" or not trace.predicted_gains:
        return None
    return max(trace.predicted_gains)


def routed_rows(store: Store, strategy: str, req: GenerationRequest, n: int) -> list[int]:
    """Bank rows of the n experts `strategy`'s router ranks first for the request (by predicted gain where the
    strategy or its CVAE's prior routes so, else by cosine): few-shot refinement's candidates (app/ml/fewshot.py)."""
    prior = cvae_prior_name(store) if strategy in ("sglora", "sglora_mean") else strategy
    n = min(n, len(store.bank) - len(store.bank.rows_of(req.exclude)))
    gain_index = None
    if prior == "transfer_routed" and store.routing is not None:
        gain_index = store.routing.gain_index(store.bank.embeddings)
    if gain_index is not None:
        return route_by_gain_index(store.bank, gain_index, req.query, n, req.exclude)[0]
    return route(store.bank, req.query, n, exclude=req.exclude)[0]


@torch.no_grad()
def generate_adapters(store: Store, strategy: str, request: GenerationRequest) -> Generation:
    check_strategy(strategy)
    if request.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {request.num_samples}")
    generation = STRATEGIES[strategy](store, request)
    generation.coverage = coverage(store.bank, request.query, request.exclude)
    if strategy != "zero_shot" and request.gate:
        # A transfer-routed prior has searched the gain index already: the gate reuses its top gain (at 100k
        # experts that second search was a quarter of a request's routing time).
        reason = gate_reason(store, request.query, request.exclude, generation.coverage,
                             _best_predicted_gain(generation.trace))
        if reason is not None:
            generation.vectors = torch.zeros_like(generation.vectors)
            generation.gated = reason
    return generation
