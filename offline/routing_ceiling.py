"""What routing to one library expert could reach: the ceilings the evaluation prints beside the served default.

On this family the served adapter is one library expert: validation picks K = 1 for every merge (a second expert
costs more than it adds; the grids are in the manifest). So a description-only router cannot beat the best single
expert for a task, and it can only do as well as what a task's description says. Two ceilings make that measurable:

    hindsight_expert   the library expert that retrieves best on the task's held-out pairs, chosen by looking at
                       them (an upper bound for any router that serves one expert; evaluation only, never served);
    attribute_router   a router *told* each task's attributes (the two parts of a synthetic "<colour>-<shape>"
                       name) instead of reading its description: ridge regression of the seen gains G[t, e] on
                       one-hot (attribute of t, attribute of e, whether the other attribute matches) interactions.
                       If the description router does as well, wording is not what holds it back.

Seen tasks: both are read off the store's transfer matrix, leave-one-task-out like the validation (the task's row
and its own expert's column removed). Unseen tasks: every expert is scored on the task's held-out pairs.

Diagnostics only: nothing here is served or chooses anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HINDSIGHT = "hindsight_expert"
ATTRIBUTES = "attribute_router"
ROWS = (HINDSIGHT, ATTRIBUTES)
_RIDGE = 1.0  # the label features are one-hot counts: any λ in 0.3–3 ranks experts alike on the seen tasks


def attributes(name: str) -> tuple[str, str] | None:
    """("red", "circle") of a two-part task name "red-circle"; None for names of other data."""
    parts = name.split("-")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _features(task: tuple[str, str], expert: tuple[str, str]) -> list[tuple]:
    """One-hot keys of a (task, expert) pair: each attribute pair, conditioned on whether the other one matches,
    and the expert itself (how much it helps anyone)."""
    (a_t, b_t), (a_e, b_e) = task, expert
    return [("a", a_t, a_e, b_t == b_e), ("b", b_t, b_e, a_t == a_e), ("expert", a_e, b_e)]


class AttributeRouter:
    """Predicted gains of experts for a task named by its attributes, fitted on observed (task, expert) gains."""

    def __init__(self, pairs: Sequence[tuple[str, str]], gains: Sequence[float], ridge: float = _RIDGE):
        self.keys: dict[tuple, int] = {}
        for task, expert in pairs:
            for key in _features(attributes(task), attributes(expert)):
                self.keys.setdefault(key, len(self.keys))
        x_nf, y_n = self._design(pairs), np.asarray(gains, np.float64)
        self.bias = float(y_n.mean())
        self.weights = np.linalg.solve(x_nf.T @ x_nf + ridge * np.eye(len(self.keys)), x_nf.T @ (y_n - self.bias))

    def _design(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        x_nf = np.zeros((len(pairs), len(self.keys)))
        for n, (task, expert) in enumerate(pairs):
            for key in _features(attributes(task), attributes(expert)):
                if key in self.keys:  # an attribute pair never observed adds nothing
                    x_nf[n, self.keys[key]] = 1.0
        return x_nf

    def predict(self, task: str, experts: Sequence[str]) -> np.ndarray:
        return self.bias + self._design([(task, e) for e in experts]) @ self.weights


def fit_attribute_router(task_ids: Sequence[str], expert_ids: Sequence[str], gains_te: np.ndarray,
                         mask_te: np.ndarray, leave_out: str | None = None) -> AttributeRouter | None:
    """Fitted on the measured gains of every (task, expert) pair but a task's own expert and `leave_out`'s row and
    column; None when the names are not two-part."""
    if any(attributes(n) is None for n in (*task_ids, *expert_ids)):
        return None
    pairs, gains = [], []
    for t, task in enumerate(task_ids):
        for e, expert in enumerate(expert_ids):
            if mask_te[t, e] and task != expert and leave_out not in (task, expert):
                pairs.append((task, expert))
                gains.append(gains_te[t, e])
    return AttributeRouter(pairs, gains)


def seen_ceilings(task_ids: Sequence[str], expert_ids: Sequence[str], gains_te: np.ndarray, mask_te: np.ndarray,
                  zero_shot_t: np.ndarray) -> dict[str, dict[str, float]]:
    """{row: {"seen LOTO mR@1", "seen LOTO headroom"}} over the seen tasks, headroom against each task's own expert
    (as the validation's); a row is absent when it cannot be computed (names not two-part, no own expert)."""
    own, picks = [], {HINDSIGHT: [], ATTRIBUTES: []}
    for t, task in enumerate(task_ids):
        own_e = list(expert_ids).index(task) if task in expert_ids else None
        if own_e is None or not mask_te[t, own_e]:
            return {}
        others = [e for e, expert in enumerate(expert_ids) if expert != task and mask_te[t, e]]
        own.append(gains_te[t, own_e])
        picks[HINDSIGHT].append(max(gains_te[t, e] for e in others))
        router = fit_attribute_router(task_ids, expert_ids, gains_te, mask_te, leave_out=task)
        if router is not None:
            predicted = router.predict(task, [expert_ids[e] for e in others])
            picks[ATTRIBUTES].append(gains_te[t, others[int(np.argmax(predicted))]])
    z, gain_own = float(np.mean(zero_shot_t)), float(np.mean(own))
    return {row: {"seen LOTO mR@1": z + float(np.mean(g)), "seen LOTO headroom": 100 * float(np.mean(g)) / gain_own}
            for row, g in picks.items() if len(g) == len(task_ids)}
