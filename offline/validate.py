"""Leave-one-task-out (LOTO) retrieval on the seen tasks: the one criterion every offline choice is made by.

For a seen task t, a generator is run as if t were new — its expert removed from routing, and a transfer router
refitted without t's row and column of the transfer matrix — and the adapter is scored (mR@1) on t's held-out
pairs. Library data only: the unseen tasks are never looked at. Flat-layout MSE to µ_e was the old yardstick and
pointed the wrong way (it rewards shrinking towards the soup); LOTO retrieval tracked unseen-task results
(Spearman 0.89 over 23 generators, DESIGN.md).

Chosen by it, in order: the transfer router's hyper-parameters (by the realised gain of its top expert, read
off the transfer matrix), each strategy's K and temperature, the gate's gain threshold, and the default
strategy (the best LOTO mR@1; zero-shot is a candidate, so a library that helps nothing serves nothing).
The CVAE's training step is chosen by the same criterion on its held-out experts (offline/train_cvae.py).

Headroom on seen tasks uses the task's own expert as the oracle: (s − zero-shot) / (own − zero-shot).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from app.ml.aggregator import coverage as library_coverage
from app.ml.backbone import Backbone
from app.ml.domain_gate import DomainModel, fit_domain
from app.ml.lora import LoRALayout
from app.ml.routing import FALLBACK_PARAMS, Gate, StoreRouting
from app.ml.store import Store, TrainedCVAE
from app.ml.strategies import GenerationRequest, generate_adapters
from app.ml.transfer_router import TransferRouter, fit_transfer_router
from offline.transfer import HeldOut, TransferMatrix, score_adapters

logger = logging.getLogger(__name__)

CRITERION = "leave-one-task-out mR@1 on the seen tasks' held-out pairs"


@dataclass(frozen=True)
class ValidationGrid:
    """What is searched. Small on purpose: 40 folds × every cell is scored by real retrieval."""

    cosine_k: tuple[int, ...] = (1, 2, 4)
    cosine_tau: tuple[float, ...] = (0.02, 0.05, 0.2)
    gain_k: tuple[int, ...] = (1, 2, 3, 4)
    gain_tau: tuple[float, ...] = (1.0, 3.0, 10.0)  # mR@1 points
    router_bandwidth: tuple[float, ...] = (0.0, 1.0)  # 0: linear kernel (bilinear metric)
    router_ridge: tuple[float, ...] = (0.01, 0.1, 1.0)
    router_shrinkage: tuple[float, ...] = (0.1, 0.3, 1.0)  # 1: centring only
    # Fit the router on every build-side phrasing of a seen task (same gains) rather than its template only, and
    # whiten by the within-task (wording) covariance: chosen, like the rest, by LOTO — here over the held-out
    # task's build-side phrasings, since users do not write the template.
    router_phrasings: tuple[bool, ...] = (False, True)
    router_within: tuple[bool, ...] = (False, True)
    gate_gain: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    # min_coverage = the least LOTO coverage of a seen task − this margin. Seen descriptions share one template, so
    # their coverage is high (0.87–0.98); the margin keeps a plainly phrased in-domain description from being gated
    # for its wording alone, while text from elsewhere ("a diagram of a neural network": 0.79) still is.
    coverage_margin: float = 0.1
    # The domain gate (app/ml/domain_gate.py): its covariance shrinkage, and the candidate thresholds as quantiles
    # of the in-domain fold distances (the threshold's meaning: the share of new in-domain wordings let through).
    domain_shrinkage: float = 0.1
    domain_quantiles: tuple[float, ...] = (0.9, 0.95, 0.975, 0.99, 1.0)


@dataclass
class LOTO:
    """Scores generators for seen tasks left out one at a time; memoises adapters already scored."""

    store: Store
    backbone: Backbone
    layout: LoRALayout
    held_out: dict[str, HeldOut]
    transfer: TransferMatrix
    phrasings: dict[str, np.ndarray] = field(default_factory=dict)  # seen task -> [P, e] build-side wordings
    router_fit: dict = field(default_factory=dict)  # {"phrasings": bool, "within": bool}: how routers are fitted
    _scores: dict[tuple[str, bytes], float] = field(default_factory=dict)
    _routers: dict[tuple, TransferRouter] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return self.transfer.task_ids

    def zero_shot(self, task: str) -> float:
        return float(self.transfer.zero_shot[self.tasks.index(task)])

    def own_expert(self, task: str) -> float:
        """The seen task's oracle: its own expert on its held-out pairs."""
        t = self.tasks.index(task)
        return self.zero_shot(task) + float(self.transfer.gains[t, self.transfer.expert_ids.index(task)])

    def score(self, task: str, vector_d: torch.Tensor) -> float:
        key = (task, hashlib.sha1(vector_d.detach().float().numpy().tobytes()).digest())
        if key not in self._scores:
            scores = score_adapters(self.backbone, self.layout, vector_d[None], self.held_out[task])
            self._scores[key] = float(scores[0])
        return self._scores[key]

    def queries(self, task: str) -> np.ndarray:
        """[P, e] the ways a seen task is described: its build-side phrasings, else its template alone."""
        if task in self.phrasings:
            return self.phrasings[task]
        return self.store.bank.embeddings[[self.store.bank.row_of(task)]]

    def fold_router(self, task: str | None, bandwidth: float, ridge: float, shrinkage: float,
                    phrasings: bool | None = None, within: bool | None = None) -> TransferRouter:
        """A transfer router that never saw `task`: its row (held-out pairs) and its expert's column removed (None:
        the full router). `phrasings`/`within` default to the chosen fit (router_fit)."""
        phrasings = self.router_fit.get("phrasings", False) if phrasings is None else phrasings
        within = self.router_fit.get("within", False) if within is None else within
        key = (task, bandwidth, ridge, shrinkage, phrasings, within)
        if key not in self._routers:
            tm, bank = self.transfer, self.store.bank
            rows = [i for i, t in enumerate(tm.task_ids) if t != task]
            cols = [j for j, e in enumerate(tm.expert_ids) if e != task]
            expert_emb = bank.embeddings[[bank.row_of(tm.expert_ids[j]) for j in cols]]
            if phrasings:
                per_task = [self.queries(tm.task_ids[i]) for i in rows]
                task_emb = np.concatenate(per_task)
                rows_r = np.repeat(rows, [len(q) for q in per_task])
                groups = rows_r if within else None
            else:
                task_emb = bank.embeddings[[bank.row_of(tm.task_ids[i]) for i in rows]]
                rows_r, groups = np.array(rows), None
            self._routers[key] = fit_transfer_router(task_emb, expert_emb, tm.gains[np.ix_(rows_r, cols)],
                                                     tm.mask[np.ix_(rows_r, cols)], bandwidth, ridge, shrinkage,
                                                     groups=groups)
        return self._routers[key]

    def fold_store(self, task: str, routing: StoreRouting | None) -> Store:
        if routing is None or routing.router is None:
            return self.store
        r = routing.router
        fold = self.fold_router(task, r.bandwidth, r.ridge, r.shrinkage)
        return replace(self.store, routing=replace(routing, router=fold))

    def generate(self, task: str, strategy: str, k: int, tau: float, routing: StoreRouting | None,
                 query: np.ndarray | None = None) -> torch.Tensor:
        """The adapter for seen task `task` as if it were new (`query`: another wording than its template)."""
        query = self.store.bank.embeddings[self.store.bank.row_of(task)] if query is None else query
        request = GenerationRequest(query=query, k=k, tau=tau, exclude=(task,), gate=False)
        return generate_adapters(self.fold_store(task, routing), strategy, request).vectors[0]

    def mean_score(self, strategy: str, k: int, tau: float, routing: StoreRouting | None = None,
                   tasks: Sequence[str] | None = None) -> float:
        tasks = self.tasks if tasks is None else tasks
        return float(np.mean([self.score(t, self.generate(t, strategy, k, tau, routing)) for t in tasks]))

    def summary(self, scores: dict[str, float]) -> dict:
        """Per-task scores -> mean mR@1, gain over zero-shot and pooled headroom against the tasks' own experts."""
        tasks = list(scores)
        s = float(np.mean([scores[t] for t in tasks]))
        z = float(np.mean([self.zero_shot(t) for t in tasks]))
        o = float(np.mean([self.own_expert(t) for t in tasks]))
        return {"loto_mr1": s, "loto_gain": s - z, "loto_headroom": (s - z) / (o - z) if o > z else float("nan"),
                "tasks": len(tasks)}


def _router_cells(loto: LOTO, grid: ValidationGrid):
    fits = [(p, w) for p in grid.router_phrasings for w in grid.router_within if p or not w]
    if not loto.phrasings:
        fits = [(False, False)]
    return itertools.product(grid.router_bandwidth, grid.router_ridge, grid.router_shrinkage, fits)


def select_router(loto: LOTO, grid: ValidationGrid) -> tuple[dict, dict, dict]:
    """Router hyper-parameters whose fold routers' top experts realise the best LOTO mR@1 over the held-out task's
    build-side wordings, read off the transfer matrix: (fit params {"bandwidth", "ridge", "shrinkage"}, how it is
    fitted {"phrasings", "within"}, every cell's figure)."""
    tm, bank, results, cells = loto.transfer, loto.store.bank, {}, {}
    for h, lam, shrink, (phrasings, within) in _router_cells(loto, grid):
        realised = []
        for t, task in enumerate(tm.task_ids):
            cols = [j for j, e in enumerate(tm.expert_ids) if e != task]
            emb = bank.embeddings[[bank.row_of(tm.expert_ids[j]) for j in cols]]
            router = loto.fold_router(task, h, lam, shrink, phrasings, within)
            for query in loto.queries(task):
                best = cols[int(np.argmax(router.predict(query, emb)))]
                if tm.mask[t, best]:
                    realised.append(tm.zero_shot[t] + tm.gains[t, best])
                else:  # an unmeasured pair (sampled transfer matrix): score it for real
                    realised.append(loto.score(task, bank.mu[bank.row_of(tm.expert_ids[best])]))
        key = f"h={h:g} λ={lam:g} s={shrink:g} phrasings={phrasings} within={within}"
        results[key] = float(np.mean(realised))
        cells[key] = ({"bandwidth": h, "ridge": lam, "shrinkage": shrink}, {"phrasings": phrasings, "within": within})
    params, fit = cells[max(results, key=results.get)]
    return params, fit, results


def _best_cell(loto: LOTO, strategy: str, ks: Sequence[int], taus: Sequence[float],
               routing: StoreRouting | None) -> tuple[dict, dict]:
    cells = {}
    for k in ks:
        if k > len(loto.store.bank) - 1:
            continue
        for tau in taus:
            cells[(k, tau)] = loto.mean_score(strategy, k, tau, routing)
    (k, tau) = max(cells, key=lambda c: (cells[c], -c[0], c[1]))  # ties: fewer experts, softer weights
    return {"k": k, "tau": tau}, {f"K={c[0]} τ={c[1]:g}": v for c, v in cells.items()}


def fit_store_domain(loto: LOTO, grid: ValidationGrid, per_task: bool, exclude: str | None = None) -> DomainModel:
    """The gate's domain: every build-side wording of every seen task (but `exclude`); one cloud or per task."""
    tasks = [t for t in loto.tasks if t != exclude]
    wordings = [loto.queries(t) for t in tasks]
    groups = np.repeat(np.arange(len(tasks)), [len(w) for w in wordings]) if per_task else None
    return fit_domain(np.concatenate(wordings), grid.domain_shrinkage, groups)


def calibrate_domain(loto: LOTO, grid: ValidationGrid, out_of_domain: np.ndarray) -> tuple[DomainModel, dict]:
    """The domain and its threshold: among quantiles of the in-domain fold distances (each seen task's wordings
    under a domain fitted without it: a new in-domain task), for the one-cloud and the per-task domain, the cell
    that best separates them from the synthetic out-of-domain descriptions (balanced accuracy; ties: the more
    permissive). Returns (the domain fitted on every seen task, the chosen cell's record)."""
    cells = {}
    for per_task in (False, True):
        inside = np.concatenate([fit_store_domain(loto, grid, per_task, t).distance(loto.queries(t))
                                 for t in loto.tasks])
        outside = fit_store_domain(loto, grid, per_task).distance(out_of_domain)
        for q in grid.domain_quantiles:
            threshold = float(np.quantile(inside, q))
            fired_in, fired_out = float(np.mean(inside > threshold)), float(np.mean(outside > threshold))
            cells[(per_task, q)] = {"per_task": per_task, "quantile": q, "threshold": threshold,
                                    "in_domain_gated": fired_in, "out_of_domain_gated": fired_out,
                                    "balanced_accuracy": (1 - fired_in + fired_out) / 2}
    best = max(cells, key=lambda c: (cells[c]["balanced_accuracy"], c[1], not c[0]))
    record = cells[best] | {"grid": {f"per_task={c[0]} q={c[1]:g}": v for c, v in cells.items()}}
    return fit_store_domain(loto, grid, best[0]), record


def calibrate_gate(loto: LOTO, strategy: str, params: dict, routing: StoreRouting, grid: ValidationGrid,
                   out_of_domain: np.ndarray | None = None) -> tuple[Gate, DomainModel | None, dict]:
    """The domain threshold (calibrate_domain) when the seen tasks come with wordings, else min_coverage: the least
    LOTO coverage of any seen task (minus a margin); then the gain threshold by gated LOTO mR@1."""
    bank = loto.store.bank
    domain, max_distance, calibration, min_coverage = None, None, {}, None
    if loto.phrasings and out_of_domain is not None and len(out_of_domain):
        domain, calibration = calibrate_domain(loto, grid, out_of_domain)
        max_distance = calibration["threshold"]
    coverage, best_gain, served, distance = {}, {}, {}, {}
    for task in loto.tasks:
        query = bank.embeddings[bank.row_of(task)]
        keep = np.array([e != task for e in bank.ids])
        coverage[task] = library_coverage(bank, query, exclude=(task,))  # what the served gate will check
        distance[task] = None if domain is None else float(
            fit_store_domain(loto, grid, calibration["per_task"], task).distance(query)[0])
        fold = loto.fold_store(task, routing)
        gains = fold.routing.predicted_gains(query, bank.embeddings[keep]) if fold.routing else None
        best_gain[task] = None if gains is None else float(gains.max())
        served[task] = loto.score(task, loto.generate(task, strategy, params["k"], params["tau"], routing))
    if domain is None:
        min_coverage = min(coverage.values()) - grid.coverage_margin
    results = {}
    for g0 in grid.gate_gain:
        gate = Gate(min_coverage, g0, max_distance)
        results[g0] = float(np.mean([loto.zero_shot(t) if gate.check(coverage[t], best_gain[t], distance[t])
                                     else served[t] for t in loto.tasks]))
    g0 = max(results, key=lambda g: (results[g], -g))
    gate = Gate(min_coverage, g0, max_distance,
                {k: v for k, v in calibration.items() if k != "grid"} if calibration else {})
    return gate, domain, {f"gain>{g:g}": v for g, v in results.items()} | (
        {"domain threshold": calibration} if calibration else {})


def validate(store: Store, backbone: Backbone, layout: LoRALayout, held_out: dict[str, HeldOut],
             transfer: TransferMatrix, grid: ValidationGrid = ValidationGrid(),
             progress: bool = True, phrasings: dict[str, np.ndarray] | None = None,
             out_of_domain: np.ndarray | None = None) -> tuple[StoreRouting, LOTO]:
    """Choose everything by LOTO retrieval; returns the store's routing record (without the CVAE's row).

    `phrasings`: seen task -> [P, e] embeddings of its build-side wordings (the template first); `out_of_domain`
    [N, e]: synthetic out-of-domain descriptions. With both, the router is chosen over wordings and the gate
    checks the domain (calibrate_domain)."""
    loto = LOTO(store, backbone, layout, held_out, transfer,
                {t: q for t, q in (phrasings or {}).items() if t in transfer.task_ids})
    steps = tqdm(total=5, desc="validation (leave-one-task-out)", disable=not progress)
    router_params, loto.router_fit, router_grid = select_router(loto, grid)
    router = loto.fold_router(None, **router_params)  # every seen task, every expert (the library's order)
    steps.update()
    routing = StoreRouting("zero_shot", {}, None, router, {})
    params, grids = {}, {"router (top-1 realised mR@1)": router_grid}
    for strategy, ks, taus in (("topk_weighted", grid.cosine_k, grid.cosine_tau),
                               ("delta_merge", grid.cosine_k, grid.cosine_tau),
                               ("transfer_routed", grid.gain_k, grid.gain_tau)):
        params[strategy], grids[strategy] = _best_cell(loto, strategy, ks, taus, routing)
        steps.update()
    table = {"zero_shot": loto.summary({t: loto.zero_shot(t) for t in loto.tasks}) | {"k": 0, "tau": None}}
    for strategy, p in params.items():
        scores = {t: loto.score(t, loto.generate(t, strategy, p["k"], p["tau"], routing)) for t in loto.tasks}
        table[strategy] = loto.summary(scores) | p
    adapter_soup_k = params["topk_weighted"]["k"]
    table["adapter_soup"] = loto.summary({t: loto.score(t, loto.generate(t, "adapter_soup", adapter_soup_k, 1.0, None))
                                          for t in loto.tasks}) | {"k": adapter_soup_k, "tau": None}
    if loto.phrasings:
        for strategy, p in params.items():
            table[strategy] |= wording_summary(loto, strategy, p, routing)
    default = max(table, key=lambda s: table[s]["loto_mr1"])
    gate, domain, gate_grid = (None, None, {}) if default == "zero_shot" else calibrate_gate(
        loto, default, params[default], routing, grid, out_of_domain)
    grids["gate (default strategy, gated LOTO mR@1)"] = gate_grid
    steps.update(2)
    steps.close()
    strategy_params = params | {"adapter_soup": {"k": adapter_soup_k, "tau": FALLBACK_PARAMS["tau"]}}
    validation = {"criterion": CRITERION, "tasks": len(loto.tasks), "table": table, "grids": grids,
                  "seen_oracle_mr1": float(np.mean([loto.own_expert(t) for t in loto.tasks]))}
    logger.info("validation: default %s; %s", default,
                {s: round(r["loto_mr1"], 2) for s, r in table.items()})
    if loto.router_fit:
        validation["router_fit"] = loto.router_fit
    return StoreRouting(default, strategy_params, gate, router, validation, domain), loto


WORDINGS_PER_TASK = slice(1, None, 5)  # LOTO over other wordings: 3 of the 13 non-template ones (cost)


def wording_summary(loto: LOTO, strategy: str, p: dict, routing: StoreRouting) -> dict:
    """LOTO figures of a strategy when each held-out seen task is described by other build-side wordings."""
    scores = {t: float(np.mean([loto.score(t, loto.generate(t, strategy, p["k"], p["tau"], routing, query=q))
                                for q in loto.queries(t)[WORDINGS_PER_TASK]])) for t in loto.tasks}
    summary = loto.summary(scores)
    return {"loto_mr1_wordings": summary["loto_mr1"], "loto_headroom_wordings": summary["loto_headroom"]}


def score_cvae(loto: LOTO, candidate: TrainedCVAE, tasks: Sequence[str]) -> float:
    """LOTO mR@1 of a CVAE's prior-mean decode (sglora_mean) on `tasks` (the CVAE's held-out experts)."""
    with_candidate = replace(loto, store=replace(loto.store, cvae=candidate))  # memoised scores stay valid
    tasks = [t for t in tasks if t in loto.held_out]
    return with_candidate.mean_score("sglora_mean", None, None, loto.store.routing, tasks)


# A CVAE replaces its prior as the default only if it beats it on held-out experts by more than this (points):
# the training step itself was chosen on those experts, so a smaller edge is selection noise.
CVAE_MIN_EDGE = 1.0


def with_cvae_rows(routing: StoreRouting, cvae: TrainedCVAE, loto: LOTO) -> StoreRouting:
    """The CVAE's rows in the validation table (on its held-out experts, beside its prior on the same tasks), and
    the default switched to sglora_mean only if it beats the default prior there by CVAE_MIN_EDGE."""
    tasks = [t for t in cvae.info.get("val_experts", []) if t in loto.held_out]
    if not tasks:
        return routing
    prior = cvae.info["prior"]
    store = replace(loto.store, cvae=cvae)
    scorer = replace(loto, store=store)
    rows = {}
    for strategy in ("sglora_mean", "sglora", prior):
        scores = {t: scorer.score(t, scorer.generate(t, strategy, None, None, routing)) for t in tasks}
        rows[strategy] = scorer.summary(scores)
    table = dict(routing.validation.get("table", {}))
    for strategy in ("sglora_mean", "sglora"):
        table[strategy] = rows[strategy] | {"prior": prior, "prior_on_same_tasks": rows[prior]["loto_mr1"],
                                            "best_step": cvae.info.get("best_step")}
    default = routing.default_strategy
    if default == prior and rows["sglora_mean"]["loto_mr1"] > rows[prior]["loto_mr1"] + CVAE_MIN_EDGE:
        default = "sglora_mean"
    params = routing.strategy_params | {s: routing.params_for(prior) for s in ("sglora", "sglora_mean")}
    return replace(routing, default_strategy=default, strategy_params=params,
                   validation=routing.validation | {"table": table})
