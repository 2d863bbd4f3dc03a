"""Evaluation rows for how people write: held-out phrasings of the unseen tasks, and out-of-domain descriptions.

Rows beside the library-template table of offline/evaluate.py (row (a)):

(b) held-out phrasings — each unseen task described by the grammar's held-out templates (offline/phrasing.py, never
    seen by the build): mR@1 per strategy averaged over the wordings, the share of the oracle's headroom it
    recovers (pooled over tasks, zero-shot and oracle from the template table: they do not depend on wording);
(c) out-of-domain — held-out unknown colours/shapes, other domains and nonsense: each description's served adapter
    is scored on every unseen task against zero-shot (harm), with the gate on and off, and the gate's firing rate;
(d) the gate's firing rate on the in-domain held-out phrasings of (b).

Everything here is a test set: nothing in it is read by the build, the validation or any choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.ml.aggregator import coverage
from app.ml.strategies import default_strategy
from offline.data import FAMILY_WORDS
from offline.phrasing import HELD_OUT_OUT_OF_DOMAIN, held_out_phrasings, pretraining_vocabulary, unknown_words
from offline.train_experts import describe

WORDING_ROWS = ("zero_shot", "topk_weighted", "delta_merge", "transfer_routed", "sglora_mean", "default")
R1 = "mR@1"
DEFAULT = "default"


def held_out_queries(ev, task) -> np.ndarray | None:
    """[H, e] embeddings of a synthetic task's held-out wordings (None: the task has no wording grammar)."""
    if not task.phrasings or "-" not in task.name:
        return None
    colour, shape = task.name.split("-", 1)
    return describe(ev.backbone, list(held_out_phrasings(colour, shape))).cpu().numpy()


def wording_rows(ev, t, queries: np.ndarray, strategies: Sequence[str]) -> dict[str, dict[str, float]]:
    """Row (b)/(d) for one unseen task: mR@1 of each strategy averaged over its held-out wordings, and the share of
    wordings the served default's gate sent to zero-shot."""
    rows = {}
    for s in strategies:
        rows[s] = {R1: float(np.mean([ev.r1(s, t, query=q) for q in queries]))}
    if DEFAULT in rows:
        rows[DEFAULT]["gated %"] = 100 * float(np.mean([(DEFAULT, q.tobytes()) in ev.gated for q in queries]))
    return rows


def wording_summary(per_task: dict[str, dict], main: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Task-averaged (b) rows with pooled headroom against the template table's zero-shot and oracle."""
    names = list(per_task)
    z = float(np.mean([main[n]["zero_shot"][R1] for n in names]))
    o = float(np.mean([main[n]["oracle"][R1] for n in names]))
    out = {}
    for s in next(iter(per_task.values())):
        mean = float(np.mean([per_task[n][s][R1] for n in names]))
        out[s] = {R1: mean, "headroom (pooled)": 100 * (mean - z) / (o - z) if o > z else float("nan")}
        if "gated %" in per_task[names[0]][s]:
            out[s]["gated %"] = float(np.mean([per_task[n][s]["gated %"] for n in names]))
    return out


def out_of_domain_rows(ev, tasks: Sequence) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Row (c): for every held-out out-of-domain description, the served adapter (gate on, and the same strategy
    with the gate off) scored on every unseen task against zero-shot. One row per category and one over all; and
    per description, whether the gate fired and its best cosine to a library description (X-Coverage), the row
    named with the words the tiny base never learned (offline/phrasing.pretraining_vocabulary)."""
    served = default_strategy(ev.store)
    zero = {t.task.name: ev.r1("zero_shot", t) for t in tasks}
    vocabulary = pretraining_vocabulary(FAMILY_WORDS)
    per_category: dict[str, list[dict[str, float]]] = {}
    per_description: dict[str, dict[str, float]] = {}
    for category, texts in HELD_OUT_OUT_OF_DOMAIN.items():
        for text, query in zip(texts, describe(ev.backbone, list(texts)).cpu().numpy(), strict=True):
            gated_on = ev.adapters(DEFAULT, query)[0]
            gated = (DEFAULT, query.tobytes()) in ev.gated
            unknown = unknown_words(text, vocabulary)
            label = f"{text} ({category}; unknown words: {', '.join(unknown) or 'none'})"
            per_description[label] = {"gate fired %": 100.0 * gated, "best cosine to a library description":
                                      coverage(ev.store.bank, query)}
            raw = None if served == "zero_shot" else ev.adapters(served, query)[0]
            for t in tasks:
                on = ev.score(gated_on, t)[R1]
                off = ev.score(raw, t)[R1]
                per_category.setdefault(category, []).append(
                    {"zero_shot": zero[t.task.name], "gate on": on, "gate off": off, "gated": float(gated)})
    rows = {}
    for category, cases in (per_category | {"all": [c for v in per_category.values() for c in v]}).items():
        z = float(np.mean([c["zero_shot"] for c in cases]))
        on, off = (float(np.mean([c[k] for c in cases])) for k in ("gate on", "gate off"))
        rows[category] = {"zero-shot mR@1": z, "served mR@1 (gate on)": on, "served − zero-shot (gate on)": on - z,
                          "served mR@1 (gate off)": off, "served − zero-shot (gate off)": off - z,
                          "gate fired %": 100 * float(np.mean([c["gated"] for c in cases])),
                          "cases below zero-shot (gate on) %": 100 * float(np.mean(
                              [c["gate on"] < c["zero_shot"] for c in cases]))}
    return rows, per_description
