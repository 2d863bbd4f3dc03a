"""What a store's validation chose, and the confidence gate: read by the strategies, written by offline/validate.

Every choice the offline job makes — the default strategy, each strategy's K and temperature, the transfer
router's hyper-parameters, the gate's thresholds — is chosen by one criterion: leave-one-task-out retrieval on
the seen tasks' held-out pairs (offline/validate.py). The manifest records the choices and the figures behind
them under "routing"; this module is their in-memory form.

The gate: when the description lies outside the library's domain (its distance to every way the seen tasks were
described exceeds `max_domain_distance`, app/ml/domain_gate.py), or no expert is predicted to help (best
predicted gain ≤ `min_predicted_gain`), the service falls back to zero-shot (B = 0) and says so, unless the client
asks otherwise. Stores validated without phrasings gate on coverage instead (cosine to the nearest expert below
`min_coverage`).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field

import numpy as np

from app.ml.domain_gate import DomainModel
from app.ml.gain_index import GainIndex
from app.ml.transfer_router import TransferRouter

FALLBACK_PARAMS = {"k": 4, "tau": 0.05}  # stores without validation: the paper's K and a peer's τ


@dataclass(frozen=True)
class Gate:
    min_coverage: float | None  # cosine(description, nearest expert) below this: outside the validated range
    min_predicted_gain: float = 0.0  # mR@1 points; the best expert must be predicted to gain more than this
    max_domain_distance: float | None = None  # domain distance δ above this: outside the library's domain
    domain_calibration: dict = field(default_factory=dict)  # what the threshold means (validation's rates)

    def check(self, coverage: float | None, best_gain: float | None,
              domain_distance: float | None = None) -> str | None:
        """None when confident; otherwise every reason that fired, phrased for a client, quoting the coverage (the
        number X-Coverage reports) whichever check fired."""
        reasons = []
        if domain_distance is not None and self.max_domain_distance is not None \
                and domain_distance > self.max_domain_distance:
            fired = self.domain_calibration.get("in_domain_gated")
            share = "" if fired is None else f", which {100 * fired:.0f} % of validated in-domain descriptions exceed"
            reasons.append(f"the description is far from every expert's domain (domain distance "
                           f"{domain_distance:.2f} > {self.max_domain_distance:.2f}{share})")
        far = coverage is not None and self.min_coverage is not None and coverage < self.min_coverage
        if far:
            reasons.append(f"the description is far from every expert in the library (best cosine {coverage:.3f} < "
                           f"{self.min_coverage:.3f}, the least any validated task had)")
        if best_gain is not None and best_gain <= self.min_predicted_gain:
            reasons.append(f"no expert is predicted to help this task (best predicted gain {best_gain:+.2f} mR@1 "
                           f"points <= {self.min_predicted_gain:+.2f})")
        if not reasons:
            return None
        if coverage is not None and not far:
            reasons.append(f"best cosine {coverage:.3f}")
        return "; ".join(reasons)


@dataclass
class StoreRouting:
    default_strategy: str
    strategy_params: dict[str, dict]  # strategy -> {"k": int, "tau": float}
    gate: Gate | None = None
    router: TransferRouter | None = None
    validation: dict = field(default_factory=dict)  # the figures behind the choices (manifest "routing.validation")
    domain: DomainModel | None = None  # the gate's domain (None: the gate checks coverage instead)
    _gain_index: GainIndex | None = field(default=None, init=False, repr=False, compare=False)
    _gain_index_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def params_for(self, strategy: str) -> dict:
        return self.strategy_params.get(strategy, FALLBACK_PARAMS)

    def predicted_gains(self, query: np.ndarray, expert_embeddings: np.ndarray) -> np.ndarray | None:
        return None if self.router is None else self.router.predict(query, expert_embeddings)

    def domain_distance(self, query: np.ndarray) -> float | None:
        return None if self.domain is None else float(self.domain.distance(query)[0])

    def gain_index(self, expert_embeddings: np.ndarray) -> GainIndex | None:
        """The router's ranking over the library it was validated on, as an index: built on first use (once per
        loaded store; a changed library makes the routing stale, so it is never reused for other experts)."""
        if self.router is None:
            return None
        with self._gain_index_lock:
            if self._gain_index is None or self._gain_index.embeddings is not expert_embeddings:
                self._gain_index = GainIndex(self.router, expert_embeddings)
            return self._gain_index

    def to_manifest(self) -> dict:
        return {"default_strategy": self.default_strategy, "strategy_params": self.strategy_params,
                "gate": None if self.gate is None else asdict(self.gate),
                "router": None if self.router is None else self.router.params(), "validation": self.validation}

    @classmethod
    def from_manifest(cls, record: dict, router_tensors: dict[str, np.ndarray] | None,
                      domain_tensors: dict[str, np.ndarray] | None = None) -> StoreRouting:
        router = None
        if record.get("router") is not None and router_tensors is not None:
            router = TransferRouter.from_tensors(router_tensors, record["router"])
        gate = Gate(**record["gate"]) if record.get("gate") else None
        domain = DomainModel.from_tensors(domain_tensors) if domain_tensors else None
        return cls(record["default_strategy"], record["strategy_params"], gate, router, record.get("validation", {}),
                   domain)
