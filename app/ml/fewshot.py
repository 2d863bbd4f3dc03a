"""Few-shot refinement: a description's routed adapter, refined on a handful of image-caption examples.

LoraHub (Huang et al., 2023) composes library LoRAs with merge weights searched on a few examples. Here the search
space is the weights w over [the description-only adapter, C routed candidate experts], merged in ΔW space
(Σ_j w_j·s·B_j A_j, re-factorised to rank r like every served merge, app/ml/delta_merge.py). w = (1, 0, …, 0) is the
description-only adapter exactly, so refinement starts where the service would answer without examples, whatever
strategy made that adapter (a merge, a CVAE sample, or zero-shot).

Methods (METHODS), each fitting CLIP's symmetric InfoNCE on the examples:
  lorahub   gradient-free, as LoraHub: CMA-ES over w (the `cma` package), objective = the loss of the served rank-r
            merge on the fit half + λ·mean|w_candidates| (LoraHub's L1 term); a step is one CMA-ES generation
            (4 + 3·ln(C+1) objective evaluations, forward passes only);
  weights   a few Adam steps on w, through the candidates' factors side by side (rank (C+1)·r: exactly Σ w_j ΔW_j,
            differentiable, no truncation while fitting; lora.per_sample_factors), same L1 term;
  factors   a few Adam steps on the description-only adapter's own factors (fine-tuning from it);
  weights+factors  `weights` until the check loss stops improving, then `factors` from the best merge;
  select    the one adapter of [description-only, candidates] with the lowest loss on every example, if it also
            checks better than the description-only one (a discrete choice: no freedom to overfit weights).

Refusing to overfit: the examples are split into a fit half and a check half (seeded). After every step the adapter
that would be served is scored on the check half; the best so far is kept (the start included, so refinement never
serves something that checks worse than the description-only adapter), and fitting stops after `patience` steps
without a better check loss, at `max_steps`, or when `time_budget_s` is spent. The best is served only if it lowers
the check loss by at least `min_improvement` (30 %) of the description-only adapter's; else the latter is. Fewer
than `min_examples` examples leave too few to check on: the start is returned unchanged, and the reason says so.

Pure torch (plus `cma`): the service and the offline evaluation call the same `refine`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from app.ml.backbone import Backbone
from app.ml.delta_merge import merge_delta_mean
from app.ml.lora import LoRALayout, per_sample_factors, per_sample_lora, vectors_to_factors
from app.ml.retrieval import contrastive_loss

METHODS = ("select", "lorahub", "weights", "factors", "weights+factors")
DEFAULT_METHOD = "weights"  # chosen by held-out retrieval on seen tasks (docs/method.md, "Few-shot refinement")

STOP_CHECK = "check loss stopped improving"
STOP_TIME = "time budget spent"
STOP_STEPS = "max_steps reached"
STOP_FEW = "too few examples to hold any out for checking"
STOP_SMALL = "the check loss fell by less than min_improvement: the description-only adapter is served"


@dataclass(frozen=True)
class FewShotConfig:
    method: str = DEFAULT_METHOD
    candidates: int = 8  # library experts the weights range over, beside the description-only adapter
    max_steps: int = 30  # gradient steps (weights, factors) or CMA-ES generations (lorahub)
    patience: int = 6  # steps without a better check loss before stopping
    min_examples: int = 4  # the least that splits into a fit and a check half of two pairs each
    time_budget_s: float = 30.0
    lr_weights: float = 0.02  # 0.1 moved too far from the description-only adapter on seen tasks
    lr_factors: float = 1e-2
    l1: float = 0.05  # LoraHub's L1 weight on the candidates' merge weights
    sigma: float = 0.3  # lorahub: CMA-ES initial step size
    bound: float = 1.5  # lorahub: weights searched in [-bound, bound] (LoraHub's range)
    seed: int = 0  # the fit/check split and CMA-ES's sampling
    # The refined adapter is served only if it lowers the check loss by at least this fraction of the description-
    # only adapter's; else the description-only adapter is (a few check pairs make small improvements noise).
    # 0.3: chosen on seen tasks (docs/method.md); smaller drops of the check loss retrieved worse more often.
    min_improvement: float = 0.3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown few-shot method {self.method!r}; choose one of {list(METHODS)}")
        if self.min_examples < 4:
            raise ValueError("min_examples must be >= 4: a fit and a check half of at least two pairs each")
        if self.candidates < 1 or self.max_steps < 1 or self.patience < 1 or self.time_budget_s <= 0:
            raise ValueError("candidates, max_steps and patience must be >= 1 and time_budget_s > 0")


@dataclass(frozen=True)
class Examples:
    """Preprocessed example pairs: pixels [N, 3, H, W] and caption tokens [N, ctx], row i a matched pair."""

    pixels: torch.Tensor
    tokens: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.pixels) != len(self.tokens):
            raise ValueError(f"{len(self.pixels)} example images but {len(self.tokens)} captions")

    def __len__(self) -> int:
        return len(self.pixels)

    def subset(self, index: torch.Tensor) -> Examples:
        return Examples(self.pixels[index], self.tokens[index])


@dataclass
class Refinement:
    """What the examples did. Losses are InfoNCE on the examples (all of them, and the check half alone)."""

    vector: torch.Tensor = field(repr=False)  # [D] the adapter to serve, on the CPU
    method: str
    examples: int
    steps: int
    seconds: float
    stopped_early: bool  # stopped before max_steps: the check loss stopped improving or the time ran out
    stop_reason: str
    loss_before: float | None = None
    loss_after: float | None = None
    check_loss_before: float | None = None
    check_loss_after: float | None = None
    weights: list[float] | None = None  # over [description-only adapter, candidates...] (weights/lorahub)
    candidate_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "vector"}


def split_fit_check(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded half/half split of n examples: (fit rows, check rows), the check half the smaller when n is odd."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n - n // 2], order[n - n // 2 :]


class _Objective:
    """Losses of adapters on example sets, with one backbone, layout and the stacked [start, candidates] [C+1, D]."""

    def __init__(self, backbone: Backbone, layout: LoRALayout, scale: float, stack: torch.Tensor):
        self.backbone, self.layout, self.scale, self.stack = backbone, layout, scale, stack
        self.logit_scale = backbone.model.logit_scale.exp().detach()
        A, B = zip(*vectors_to_factors(layout, stack).values(), strict=True)  # per block [J, 3, r, d], [J, 3, d, r]
        self._factors = list(zip(layout.blocks, A, B, strict=True))

    def _loss(self, ex: Examples, context: Callable) -> torch.Tensor:
        index = torch.zeros(len(ex), dtype=torch.long)
        with context(index):
            image_emb = self.backbone.encode_images(ex.pixels)
        with context(index):
            text_emb = self.backbone.encode_text(ex.tokens)
        return contrastive_loss(image_emb, text_emb, self.logit_scale)

    def of_vector(self, vector_d: torch.Tensor, ex: Examples) -> torch.Tensor:
        """Loss of one flat rank-r adapter (differentiable in it)."""
        return self._loss(ex, lambda index: per_sample_lora(self.layout, vector_d[None], index))

    def of_weights(self, w_j: torch.Tensor, ex: Examples) -> torch.Tensor:
        """Loss of Σ_j w_j ΔW_j, exactly, with the factors side by side (differentiable in w)."""
        j = len(w_j)
        factors = {}
        for (path, d), A, B in self._factors:
            r = A.shape[2]
            A_cat = A.permute(1, 0, 2, 3).reshape(3, j * r, d)
            B_cat = (w_j.view(j, 1, 1, 1) * B).permute(1, 2, 0, 3).reshape(3, d, j * r)
            factors[path] = (A_cat[None], B_cat[None])
        return self._loss(ex, lambda index: per_sample_factors(factors, index))

    def merged(self, w_j) -> torch.Tensor:
        """The served adapter for weights w: the rank-r factors of Σ_j w_j ΔW_j [D]."""
        w = w_j.detach().cpu().numpy() if isinstance(w_j, torch.Tensor) else np.asarray(w_j)
        return merge_delta_mean(self.layout, self.scale, self.stack, w).float()


class _EarlyStop:
    """Keeps the adapter with the best check loss so far; says when to stop (patience, steps, time)."""

    def __init__(self, objective: _Objective, check: Examples, start: torch.Tensor, config: FewShotConfig,
                 t0: float, clock: Callable[[], float]):
        self.objective, self.check, self.config, self.t0, self.clock = objective, check, config, t0, clock
        with torch.no_grad():
            self.start_loss = float(objective.of_vector(start, check))
        self.best_loss, self.best_vector, self.best_weights = self.start_loss, start, None
        self.steps, self.since_best, self.reason = 0, 0, None

    def offer(self, vector: torch.Tensor, weights=None) -> bool:
        """Count a step and score the adapter it led to; False: stop now (self.reason says why)."""
        self.steps += 1
        with torch.no_grad():
            loss = float(self.objective.of_vector(vector, self.check))
        if loss < self.best_loss:
            self.best_loss, self.best_vector, self.since_best = loss, vector.detach().clone(), 0
            self.best_weights = None if weights is None else [float(x) for x in weights]
        else:
            self.since_best += 1
        if self.since_best >= self.config.patience:
            self.reason = STOP_CHECK
        elif self.steps >= self.config.max_steps:
            self.reason = STOP_STEPS
        elif self.clock() - self.t0 >= self.config.time_budget_s:
            self.reason = STOP_TIME
        return self.reason is None


def _start_weights(j: int, device) -> torch.Tensor:
    w = torch.zeros(j, dtype=torch.float32, device=device)
    w[0] = 1.0
    return w


def _fit_weights(obj: _Objective, fit: Examples, stop: _EarlyStop, config: FewShotConfig) -> None:
    w = _start_weights(len(obj.stack), obj.stack.device).requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=config.lr_weights)
    while True:
        loss = obj.of_weights(w, fit) + config.l1 * w[1:].abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if not stop.offer(obj.merged(w), w.detach()):
            return


def _fit_factors(obj: _Objective, fit: Examples, stop: _EarlyStop, config: FewShotConfig,
                 start: torch.Tensor | None = None) -> None:
    v = (obj.stack[0] if start is None else start).detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=config.lr_factors)
    while True:
        loss = obj.of_vector(v, fit)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if not stop.offer(v.detach()):
            return


def _fit_lorahub(obj: _Objective, fit: Examples, stop: _EarlyStop, config: FewShotConfig) -> None:
    import cma  # CMA-ES: the gradient-free search (LoraHub uses nevergrad, whose default picks CMA at this size)

    x0 = _start_weights(len(obj.stack), "cpu").tolist()
    es = cma.CMAEvolutionStrategy(x0, config.sigma, {"seed": config.seed + 1, "bounds": [-config.bound, config.bound],
                                                     "verbose": -9})

    @torch.no_grad()
    def objective(x) -> float:
        return float(obj.of_vector(obj.merged(x), fit)) + config.l1 * float(np.abs(np.asarray(x[1:])).mean())

    while True:
        xs = es.ask()
        values = [objective(x) for x in xs]
        es.tell(xs, values)
        best = xs[int(np.argmin(values))]
        if not stop.offer(obj.merged(best), best):
            return


def _fit_weights_then_factors(obj: _Objective, fit: Examples, stop: _EarlyStop, config: FewShotConfig) -> None:
    """Merge weights until the check loss stops improving, then fine-tune the best merge's factors (same
    patience, the remaining steps and time)."""
    _fit_weights(obj, fit, stop, config)
    if stop.reason == STOP_CHECK:
        stop.reason, stop.since_best = None, 0
        _fit_factors(obj, fit, stop, config, start=stop.best_vector)


def _fit_select(obj: _Objective, fit: Examples, stop: _EarlyStop, config: FewShotConfig) -> None:
    """The one adapter of [description-only, candidates] with the lowest loss on every example, served only if it
    also checks better than the description-only adapter: a discrete choice, which a handful of examples can make
    without the freedom to overfit that continuous weights have. A step is one candidate scored."""
    everything = Examples(torch.cat([fit.pixels, stop.check.pixels]), torch.cat([fit.tokens, stop.check.tokens]))
    losses = []
    with torch.no_grad():
        for j in range(len(obj.stack)):
            losses.append(float(obj.of_vector(obj.stack[j], everything)))
            stop.steps += 1
    best = int(np.argmin(losses))
    stop.steps -= 1  # offer() counts the step that scores the chosen one on the check half
    weights = _start_weights(len(obj.stack), "cpu")
    weights[0], weights[best] = 0.0, 1.0
    stop.offer(obj.stack[best], weights)
    stop.reason = stop.reason or STOP_STEPS


_FITS = {"select": _fit_select, "lorahub": _fit_lorahub, "weights": _fit_weights, "factors": _fit_factors,
         "weights+factors": _fit_weights_then_factors}


def refine(backbone: Backbone, layout: LoRALayout, scale: float, start_d: torch.Tensor, candidates_cd: torch.Tensor,
           examples: Examples, config: FewShotConfig = FewShotConfig(), candidate_ids: list[str] | None = None,
           clock: Callable[[], float] = time.perf_counter) -> Refinement:
    """Refine the description-only adapter `start_d` [D] on `examples`, over `candidates_cd` [C, D] (the routed
    experts' µ). Blocking torch work; the shared model is never modified (adapters travel per sample)."""
    t0 = clock()
    device = backbone.device
    start = start_d.detach().float().to(device)
    ids = list(candidate_ids or [])
    if len(examples) < config.min_examples:
        return Refinement(start_d.detach().float().cpu(), config.method, len(examples), 0, clock() - t0, False,
                          f"{STOP_FEW} (need {config.min_examples}, got {len(examples)})", candidate_ids=ids)
    examples = Examples(examples.pixels.to(device), examples.tokens.to(device))
    stack = torch.cat([start[None], candidates_cd.detach().float().to(device)])
    obj = _Objective(backbone, layout, scale, stack)
    fit_rows, check_rows = split_fit_check(len(examples), config.seed)
    fit, check = examples.subset(fit_rows), examples.subset(check_rows)
    stop = _EarlyStop(obj, check, start, config, t0, clock)
    _FITS[config.method](obj, fit, stop, config)
    best = stop.best_vector
    reason = stop.reason
    if best is not start and stop.best_loss > stop.start_loss * (1 - config.min_improvement):
        best, stop.best_loss, stop.best_weights = start, stop.start_loss, None
        reason = f"{reason}; {STOP_SMALL} ({100 * config.min_improvement:g} %)"
    with torch.no_grad():
        before, after = float(obj.of_vector(start, examples)), float(obj.of_vector(best, examples))
    return Refinement(best.float().cpu(), config.method, len(examples), stop.steps, clock() - t0,
                      stop.reason != STOP_STEPS, reason, before, after, stop.start_loss, stop.best_loss,
                      stop.best_weights, ids)


def refine_routed(store, backbone: Backbone, layout: LoRALayout, strategy: str, request, start_d: torch.Tensor,
                  examples: Examples, config: FewShotConfig = FewShotConfig()) -> Refinement:
    """`refine` over the candidates `strategy`'s router ranks first for `request` (a GenerationRequest): what the
    service and the offline evaluation both serve for a description plus examples."""
    from app.ml.strategies import routed_rows  # strategies is the store-aware layer; this module stays below it

    rows = routed_rows(store, strategy, request, config.candidates)
    candidates, _ = store.bank.gather(rows)
    return refine(backbone, layout, store.lora_config.scale, start_d, candidates, examples, config,
                  [store.bank.ids[r] for r in rows])
