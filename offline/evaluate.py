"""`python -m offline evaluate`: the paper's comparison table on tasks the library never saw.

For every seed: build (or reuse) a store with that seed's split / expert training / CVAE training, then for
every unseen task score each strategy — zero_shot, model_soup, adapter_soup, topk_weighted, sglora (one CVAE
sample), sglora_mean (prior mean) and the oracle (an expert trained on the task's own training pairs) — by
I2T and T2I Recall@1/5/10 on the task's held-out pairs. Beside raw recall: the share of the oracle's headroom
recovered, four checks (shuffled descriptions, coverage ablation, spread over CVAE samples, K/τ sweep; `--check`
runs a subset), and the rows for how people write (offline/evaluate_wording.py: held-out wordings, out-of-domain
descriptions, the gate's firing rates). Seeds are summarised as mean ± std, and the headline figures as pooled over
every task-seed, mean and worst seed; everything lands in one output directory, rewritten after each seed:

    <out>/config.json      build config, evaluation config, seeds: what reproduces the run
    <out>/split.json       per seed: seen/unseen task names and the seeds actually used
    <out>/results.json     per seed, per task and averaged numbers, the summary over seeds, and the provenance
                           (command, commit, machine, threads, wall time; "complete" false until the last seed)
    <out>/report.md        the tables
    <out>/recall.png       bar chart of the summary
    <out>/seed<i>/store    the store built for seed i (reused when present), and seed<i>/oracles/

Numbers are percentages. A "grid" below is {row: {column: value}}; every table is one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from app.ml.aggregator import route
from app.ml.backbone import Backbone, load_backbone
from app.ml.fewshot import FewShotConfig, Refinement
from app.ml.lora import LoRALayout, inject_lora
from app.ml.retrieval import embed_pairs, recall_at_k, same_caption_mask
from app.ml.store import BASE_WEIGHTS_FILE, Store, StoreError, load_store, routing_record, routing_tensors
from app.ml.strategies import GenerationRequest, default_strategy, generate_adapters
from offline import evaluate_wording as wording
from offline import pipeline
from offline import routing_ceiling as ceiling
from offline.config import TINY, BuildConfig, DatasetConfig, TaskSplit, load_tasks, split_dataset
from offline.data import Task
from offline.fewshot_eval import draw_examples, refined_adapter
from offline.threads import fixed_threads
from offline.train_experts import describe, encode_pairs, train_expert
from offline.transfer import HeldOut, score_adapters

logger = logging.getLogger(__name__)

Grid = dict[str, dict[str, float]]

# "default" is what the service serves: the store's validated default strategy, with its confidence gate. Every
# other row is the raw strategy (gate off), with the K/τ the store's validation chose for it.
STRATEGY_ORDER = ("zero_shot", "model_soup", "adapter_soup", "topk_weighted", "delta_merge", "transfer_routed",
                  "sglora", "sglora_mean", "default", "oracle")
CHECKED = ("topk_weighted", "delta_merge", "transfer_routed", "default")  # deterministic strategies the checks vary
DEFAULT = "default"
R1 = "mR@1"  # mean of I2T and T2I R@1: the single number headroom and the checks use

# The tiny preset already is the paper-sized synthetic setup (40 seen + 8 unseen tasks, 80 training and 60
# held-out pairs per task); "paper-synthetic" names it for the report command.
PRESETS = {"tiny": TINY, "paper-synthetic": TINY}


@dataclass(frozen=True)
class EvalConfig:
    strategies: tuple[str, ...] = STRATEGY_ORDER
    ks: tuple[int, ...] = (1, 5, 10)
    max_tasks: int | None = None  # evaluate only the first N unseen tasks (quick runs)
    min_oracle_gain: float = 1.0  # tasks where oracle − zero_shot < this many points are left out of headroom
    checks: bool = True
    check_names: tuple[str, ...] = ("semantic", "coverage", "spread", "sweep")  # which checks `checks` runs
    wordings: bool = True  # rows (b)-(d): held-out phrasings and out-of-domain descriptions (evaluate_wording.py)
    cvae_samples: int = 5  # check (3): CVAE samples per task
    coverage_remove: tuple[int, ...] = (1, 4)  # check (2): drop the N experts most similar to the description
    k_grid: tuple[int, ...] = (1, 2, 4, 8)  # check (4)
    tau_grid: tuple[float, ...] = (0.02, 0.05, 0.2)
    # Rows "n examples": the served default refined on n pairs drawn from the unseen task's TRAINING pairs
    # (never its held-out ones), app/ml/fewshot.py with its default method.
    examples: tuple[int, ...] = ()
    # Rows offline/routing_ceiling.py: the best single library expert in hindsight, and a router told the task's
    # attributes — what routing to one expert could reach, beside what the served router reaches.
    ceilings: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGY_ORDER)
        if unknown or not {"zero_shot", "oracle"} <= set(self.strategies):
            raise ValueError(f"strategies must be among {STRATEGY_ORDER} and include zero_shot and oracle "
                             f"(headroom is measured between them); got {self.strategies}")


def examples_row(n: int) -> str:
    return f"{n} example{'s' if n != 1 else ''}"


def seeded(config: BuildConfig, seed: int) -> BuildConfig:
    """The build config of one evaluation seed: split, expert batch order and CVAE init all move with it.

    Seeds are offsets, so seed 0 is the config exactly as given (and reuses a store already built from it).
    """
    return replace(config,
                   dataset=replace(config.dataset, split_seed=config.dataset.split_seed + seed),
                   experts=replace(config.experts, seed=config.experts.seed + seed),
                   cvae=replace(config.cvae, seed=config.cvae.seed + seed))


# ------------------------------------------------------------------------------------------ scoring


def flat_recall(sim: torch.Tensor, ks: Sequence[int], positives: torch.Tensor | None = None) -> dict[str, float]:
    """app.ml.retrieval.recall_at_k as table columns: {"I2T R@1": .., "T2I R@10": .., "mR@1": ..}."""
    recall = recall_at_k(sim, ks, positives)
    row = {f"{d.upper()} R@{k}": recall[d][k] for d in ("i2t", "t2i") for k in ks}
    row[R1] = (recall["i2t"][1] + recall["t2i"][1]) / 2 if 1 in ks else math.nan
    return row


@dataclass
class EvalTask:
    task: Task  # training pairs only (the oracle's data)
    pixels: torch.Tensor  # held-out images, preprocessed once
    tokens: torch.Tensor  # held-out captions, tokenised once
    query: np.ndarray  # routing embedding of the task's true description
    positives: torch.Tensor  # [N, N] correct image-caption matches: identical captions count (same_caption_mask)


class Evaluator:
    """Scores adapters of one store on held-out pairs; one instance per seed."""

    def __init__(self, store: Store, backbone: Backbone, layout: LoRALayout, config: BuildConfig, seed: int,
                 eval_cfg: EvalConfig, oracle_dir: Path):
        self.store, self.backbone, self.layout = store, backbone, layout
        self.config, self.seed, self.eval_cfg, self.oracle_dir = config, seed, eval_cfg, oracle_dir
        self._r1: dict[tuple, float] = {}
        self.gated: set[tuple[str, bytes]] = set()  # (row, query) pairs the gate sent to zero-shot

    def prepare(self, task: Task, test_pairs: Sequence) -> EvalTask:
        pixels, tokens = encode_pairs(self.backbone, test_pairs)
        query = describe(self.backbone, [task.description])[0].cpu().numpy()
        return EvalTask(task, pixels, tokens, query, same_caption_mask([p.caption for p in test_pairs]))

    def score(self, adapter: torch.Tensor | None, t: EvalTask) -> dict[str, float]:
        images, texts = embed_pairs(self.backbone, self.layout, adapter, t.pixels, t.tokens)
        return flat_recall(images @ texts.T, self.eval_cfg.ks, t.positives)

    def adapters(self, strategy: str, query: np.ndarray, k: int | None = None, tau: float | None = None,
                 exclude: Sequence[str] = (), num_samples: int = 1) -> list[torch.Tensor | None]:
        if strategy == "zero_shot":
            return [None] * num_samples  # the base model itself (B = 0 adds nothing)
        served = strategy == DEFAULT
        request = GenerationRequest(query=query, k=k, tau=tau, seed=self.seed, num_samples=num_samples,
                                    exclude=tuple(exclude), gate=served)
        name = default_strategy(self.store) if served else strategy
        if name == "zero_shot":
            return [None] * num_samples
        generation = generate_adapters(self.store, name, request)
        if generation.gated:
            self.gated.add((strategy, query.tobytes()))
        return list(generation.vectors)

    def oracle(self, task: Task) -> torch.Tensor:
        """An expert trained on the unseen task's own training pairs (its µ), cached on disk per seed."""
        path = self.oracle_dir / f"{task.name}.safetensors"
        if path.exists():
            return load_file(str(path))["mu"]
        mu = train_expert(self.backbone, self.store.lora_config, task.pairs, self.config.experts).mu
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mu": mu.contiguous()}, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)
        return mu

    def r1(self, strategy: str, t: EvalTask, query: np.ndarray | None = None, k: int | None = None,
           tau: float | None = None, exclude: Sequence[str] = ()) -> float:
        """mR@1 of one deterministic adapter, memoised: the checks ask for the same cell more than once."""
        query = t.query if query is None else query
        key = (strategy, t.task.name, query.tobytes(), k, tau, tuple(sorted(exclude)))
        if key not in self._r1:
            self._r1[key] = self.score(self.adapters(strategy, query, k, tau, exclude)[0], t)[R1]
        return self._r1[key]

    # --- one function per concern, each returning this task's numbers

    def main(self, t: EvalTask) -> Grid:
        rows = {}
        for strategy in self.eval_cfg.strategies:
            adapter = self.oracle(t.task) if strategy == "oracle" else self.adapters(strategy, t.query)[0]
            rows[strategy] = self.score(adapter, t)
        for n in self.eval_cfg.examples:
            rows[examples_row(n)] = self.score(self.refined(t, n).vector, t)
        if self.eval_cfg.ceilings:
            rows |= self.ceilings(t)
        return rows

    def ceilings(self, t: EvalTask) -> Grid:
        """The routing_ceiling rows for one unseen task: every library expert scored on its held-out pairs, the best
        one served in hindsight, and the attribute router's pick ({} for data whose stores lack what they need)."""
        bank, rows = self.store.bank, {}
        r1_e = score_adapters(self.backbone, self.layout, bank.mu.float(), HeldOut(t.pixels, t.tokens, t.positives))
        rows[ceiling.HINDSIGHT] = self.score(bank.mu[int(np.argmax(r1_e))].float(), t)
        if self.attribute_router is not None and ceiling.attributes(t.task.name) is not None:
            pick = int(np.argmax(self.attribute_router.predict(t.task.name, bank.ids)))
            rows[ceiling.ATTRIBUTES] = self.score(bank.mu[pick].float(), t)
        return rows

    @cached_property
    def attribute_router(self) -> ceiling.AttributeRouter | None:
        """routing_ceiling's attribute router fitted on the store's whole transfer matrix (None: it has none)."""
        grid = full_transfer_grid(self.store)
        return None if grid is None else ceiling.fit_attribute_router(grid["ids"], grid["ids"], grid["gains"],
                                                                      grid["mask"])

    def refined(self, t: EvalTask, n: int) -> Refinement:
        """The served default refined on n examples drawn from the task's training pairs (seeded per seed, n)."""
        examples = draw_examples(self.backbone, t.task.pairs, n, seed=1000 * self.seed + n)
        return refined_adapter(self.store, self.backbone, self.layout, t.query, examples,
                               FewShotConfig(seed=self.seed), seed=self.seed)

    def shuffled(self, t: EvalTask, other: EvalTask) -> Grid:
        """Check (1): route with another task's description; the held-out pairs stay this task's."""
        return {s: {"true description": self.r1(s, t), "shuffled description": self.r1(s, t, query=other.query)}
                for s in CHECKED}

    def coverage(self, t: EvalTask) -> Grid:
        """Check (2): remove the N library experts most similar to the description, then route among the rest."""
        rows: Grid = {s: {"full library": self.r1(s, t)} for s in CHECKED}
        for n in self.eval_cfg.coverage_remove:
            if n + 4 > len(self.store.bank):
                continue
            nearest = [self.store.bank.ids[r] for r in route(self.store.bank, t.query, n)[0]]
            for s in CHECKED:
                rows[s][f"top-{n} removed"] = self.r1(s, t, exclude=nearest)
        return rows

    def spread(self, t: EvalTask) -> Grid:
        """Check (3): R@1 of several CVAE samples for one description."""
        r1s = [self.score(a, t)[R1] for a in self.adapters("sglora", t.query, num_samples=self.eval_cfg.cvae_samples)]
        return {"sglora": {"mean": float(np.mean(r1s)), "std over samples": float(np.std(r1s)),
                           "min": min(r1s), "max": max(r1s)}}

    def sweep(self, t: EvalTask) -> Grid:
        """Check (4): mR@1 over a K × τ grid, one row per (strategy, K)."""
        ks = [k for k in self.eval_cfg.k_grid if k <= len(self.store.bank)]
        return {f"{s} K={k}": {f"τ={tau:g}": self.r1(s, t, k=k, tau=tau) for tau in self.eval_cfg.tau_grid}
                for s in CHECKED for k in ks}


# ------------------------------------------------------------------------------------------ aggregation


def mean_grid(grids: Sequence[Grid]) -> Grid:
    """Cell-wise mean of same-shaped grids (e.g. over tasks)."""
    return {r: {c: float(np.mean([g[r][c] for g in grids])) for c in grids[0][r]} for r in grids[0]}


def mean_std_grid(grids: Sequence[Grid]) -> dict[str, dict[str, tuple[float, float]]]:
    """Cell-wise (mean, std) over seeds, ignoring NaN (a seed where a cell is undefined)."""
    def stat(values: list[float]) -> tuple[float, float]:
        v = np.array([x for x in values if not math.isnan(x)])
        return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (math.nan, math.nan)

    return {r: {c: stat([g[r][c] for g in grids if r in g and c in g[r]]) for c in grids[0][r]} for r in grids[0]}


def headroom(per_task: dict[str, Grid], min_gain: float) -> tuple[Grid, Grid, list[str]]:
    """Share (in %) of the oracle's mR@1 gain over zero-shot that each strategy recovers.

    Per task: 100·(s − z) / (o − z). Tasks where the oracle gains less than `min_gain` points have no meaningful
    headroom (the ratio explodes or flips sign) and are left out of the per-task average; they are returned so
    the report can say how many. "pooled" is the ratio of task-averaged gains over all tasks, which has no such
    instability and is reported beside it.
    """
    per_task_h, skipped = {}, []
    for name, rows in per_task.items():
        z, o = rows["zero_shot"][R1], rows["oracle"][R1]
        if o - z < min_gain:
            skipped.append(name)
            per_task_h[name] = {s: math.nan for s in rows}
        else:
            per_task_h[name] = {s: 100 * (rows[s][R1] - z) / (o - z) for s in rows}
    kept = [n for n in per_task if n not in skipped]
    avg = {s: rows_mean(per_task, s) for s in next(iter(per_task.values()))}
    z, o = avg["zero_shot"], avg["oracle"]
    summary = {s: {"headroom": float(np.mean([per_task_h[n][s] for n in kept])) if kept else math.nan,
                   "headroom (pooled)": 100 * (avg[s] - z) / (o - z) if o - z > 0 else math.nan} for s in avg}
    return per_task_h, summary, skipped


def rows_mean(per_task: dict[str, Grid], strategy: str) -> float:
    return float(np.mean([rows[strategy][R1] for rows in per_task.values()]))


# ------------------------------------------------------------------------------------------ one seed


def evaluation_split(ctx: pipeline.BuildContext, eval_dataset: DatasetConfig | None, seed: int) -> TaskSplit:
    """In-domain: the build's own unseen tasks. Cross-dataset: every task of `eval_dataset`, all unseen."""
    if eval_dataset is None:
        return ctx.split
    tasks = load_tasks(eval_dataset)
    ds = replace(eval_dataset, n_unseen=len(tasks), split_seed=eval_dataset.split_seed + seed)
    return split_dataset(tasks, ds)


def share_base(ctx: pipeline.BuildContext, shared: Path | None) -> None:
    """Seeds of one run pretrain one base when its corpus does not depend on the split (synthetic data): the first
    seed's base file is linked into the next seeds' work folders instead of pretraining it again."""
    base = ctx.base_weights
    if shared is None or base is None or base.exists() or not shared.exists() or ctx.config.dataset.kind != "synthetic":
        return
    base.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared, base)


def ensure_store(config: BuildConfig, store_dir: Path, progress: bool,
                 shared_base: Path | None = None) -> pipeline.BuildContext:
    """The seed's store: reused when complete, built otherwise; refused if it was built on another split."""
    ctx = pipeline.make_context(config, store_dir)
    share_base(ctx, shared_base)
    if not ((store_dir / "manifest.json").exists() and (store_dir / "cvae.safetensors").exists()):
        pipeline.build(config, store_dir, progress=progress)
    elif routing_record(json.loads((store_dir / "manifest.json").read_text())) is None:
        pipeline.step_validate(ctx, progress=progress)  # built before validation existed: its experts are reused
        pipeline.step_train_cvae(ctx, progress=progress)
    built_on = [e["id"] for e in json.loads((store_dir / "manifest.json").read_text())["experts"]]
    if built_on != [t.name for t in ctx.split.seen]:
        raise StoreError(f"{store_dir} holds experts for another split than this config and seed; "
                         "delete it or use another --out")
    return ctx


def evaluate_seed(config: BuildConfig, seed: int, seed_dir: Path, eval_cfg: EvalConfig,
                  eval_dataset: DatasetConfig | None = None, store_dir: Path | None = None,
                  device: str = "cpu", progress: bool = True, shared_base: Path | None = None) -> dict:
    ctx = ensure_store(config, store_dir or seed_dir / "store", progress, shared_base)
    split = evaluation_split(ctx, eval_dataset, seed)
    store = load_store(ctx.out)
    backbone = load_backbone(store.base_model["name"], store.base_pretrained(), device)
    ev = Evaluator(store, backbone, inject_lora(backbone.model, store.lora_config), config, seed, eval_cfg,
                   seed_dir / "oracles")
    tasks = [ev.prepare(t, split.test_pairs[t.name]) for t in split.unseen[: eval_cfg.max_tasks]]
    others = derangement(len(tasks), seed)

    per_task: dict[str, dict[str, Grid]] = {}
    checks_run = {"coverage": ev.coverage, "spread": ev.spread, "sweep": ev.sweep}
    for i, t in enumerate(tqdm(tasks, desc=f"seed {seed}: unseen tasks", disable=not progress)):
        results = {"main": ev.main(t)}
        if eval_cfg.checks:
            if others is not None and "semantic" in eval_cfg.check_names:
                results["semantic"] = ev.shuffled(t, tasks[others[i]])
            results |= {name: check(t) for name, check in checks_run.items() if name in eval_cfg.check_names}
        per_task[t.task.name] = results
    gated_template = sum((DEFAULT, t.query.tobytes()) in ev.gated for t in tasks)

    main = {n: r["main"] for n, r in per_task.items()}
    task_headroom, headroom_summary, skipped = headroom(main, eval_cfg.min_oracle_gain)
    average = mean_grid(list(main.values()))
    for s, h in headroom_summary.items():
        average[s] |= h
    average |= {s: average[s] | seen_loto(store, s) for s in average}
    for row, figures in seen_ceilings(store).items():
        if row in average:
            average[row] |= figures
    served = default_strategy(store)
    if DEFAULT in average:
        average[DEFAULT] |= {"gated tasks": float(gated_template),
                             "tasks below zero-shot": float(sum(main[n][DEFAULT][R1] < main[n]["zero_shot"][R1]
                                                                for n in main))}
    checks = {name: mean_grid([r[name] for r in per_task.values()])
              for name in ("semantic", "coverage", "spread", "sweep") if all(name in r for r in per_task.values())}
    wordings = how_people_write(ev, tasks, main, eval_cfg, progress) if eval_cfg.wordings else {}
    return wordings | {
        "seed": seed,
        "split": split_record(ctx, split, tasks, eval_dataset, seed),
        "store_version": store.version,
        "default_strategy": served,
        "average": average,
        "checks": checks,
        "per_task": {n: r["main"] for n, r in per_task.items()},
        "per_task_headroom": task_headroom,
        "headroom_skipped": skipped,
        "per_task_checks": {n: {k: v for k, v in r.items() if k != "main"} for n, r in per_task.items()},
    }


def how_people_write(ev: Evaluator, tasks: Sequence[EvalTask], main: dict[str, Grid], eval_cfg: EvalConfig,
                     progress: bool) -> dict:
    """Rows (b)-(d) of offline/evaluate_wording.py for one seed ({} when the tasks have no wording grammar)."""
    per_task = {}
    for t in tqdm(tasks, desc=f"seed {ev.seed}: held-out wordings", disable=not progress):
        queries = wording.held_out_queries(ev, t.task)
        if queries is not None:
            strategies = [s for s in wording.WORDING_ROWS if s in eval_cfg.strategies]
            per_task[t.task.name] = wording.wording_rows(ev, t, queries, strategies)
    if not per_task:
        return {}
    out_of_domain, per_description = wording.out_of_domain_rows(ev, tasks)
    return {"wordings": wording.wording_summary(per_task, main), "wordings_per_task": per_task,
            "out_of_domain": out_of_domain, "out_of_domain_descriptions": per_description}


def seen_loto(store: Store, strategy: str) -> dict[str, float]:
    """The store's leave-one-task-out figure on the seen tasks for a row (the offline validation's), or NaN."""
    table = store.routing.validation.get("table", {}) if store.routing is not None else {}
    row = table.get(default_strategy(store) if strategy == DEFAULT else strategy)
    if strategy == "oracle":
        return {"seen LOTO mR@1": store.routing.validation.get("seen_oracle_mr1", math.nan) if table else math.nan,
                "seen LOTO headroom": 100.0 if table else math.nan}
    if row is None:
        return {"seen LOTO mR@1": math.nan, "seen LOTO headroom": math.nan}
    return {"seen LOTO mR@1": row["loto_mr1"], "seen LOTO headroom": 100 * row["loto_headroom"]}


def full_transfer_grid(store: Store) -> dict | None:
    """The store's transfer matrix when it covers every expert as a seen task ({"ids", "gains", "mask", "zero_shot"}:
    rows and columns in library order), else None (no matrix, or experts imported without a row)."""
    tensors = routing_tensors(store)
    if not tensors or len(tensors["gains"]) != len(store.bank):
        return None
    return {"ids": list(store.bank.ids), "gains": tensors["gains"].astype(np.float64),
            "mask": tensors["mask"].astype(bool), "zero_shot": tensors["zero_shot"].astype(np.float64)}


def seen_ceilings(store: Store) -> dict[str, dict[str, float]]:
    """routing_ceiling's seen-task figures from the store's transfer matrix ({} without a full one)."""
    grid = full_transfer_grid(store)
    return {} if grid is None else ceiling.seen_ceilings(grid["ids"], grid["ids"], grid["gains"], grid["mask"],
                                                         grid["zero_shot"])


def derangement(n: int, seed: int) -> list[int] | None:
    """A seeded permutation with no fixed point (task i is routed with task p[i]'s description)."""
    if n < 2:
        return None
    rng = random.Random(seed)
    shift = rng.randrange(1, n)
    order = list(range(n))
    rng.shuffle(order)
    p = [0] * n
    for j in range(n):  # a random cycle structure over a shuffled order: never maps i to itself
        p[order[j]] = order[(j + shift) % n]
    return p


def split_record(ctx: pipeline.BuildContext, split: TaskSplit, tasks: Sequence[EvalTask],
                 eval_dataset: DatasetConfig | None, seed: int) -> dict:
    c = ctx.config
    return {"seen": [t.name for t in ctx.split.seen], "unseen": [t.task.name for t in tasks],
            "held_out_pairs": {t.task.name: len(split.test_pairs[t.task.name]) for t in tasks},
            "library_split_seed": c.dataset.split_seed,
            "eval_split_seed": (eval_dataset.split_seed + seed) if eval_dataset else c.dataset.split_seed,
            "expert_seed": c.experts.seed, "cvae_seed": c.cvae.seed, "cvae_sampling_seed": seed,
            "eval_dataset": asdict(eval_dataset) if eval_dataset else None}


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Report:
    out: Path
    results: dict = field(default_factory=dict)
    markdown: str = ""


def run_evaluation(config: BuildConfig, out: Path, seeds: Sequence[int] = (0,), eval_cfg: EvalConfig = EvalConfig(),
                   eval_dataset: DatasetConfig | None = None, store_dir: Path | None = None, device: str = "cpu",
                   progress: bool = True, command: str | None = None) -> Report:
    """Evaluate every seed, summarise, and write config/split/results/report/chart into `out`.

    `store_dir` evaluates an already built store instead of building `<out>/seed<i>/store` (one seed only; it
    must have been built from `seeded(config, seed)`).
    """
    if store_dir is not None and len(seeds) != 1:
        raise ValueError("an existing store (--store) can only be evaluated for one seed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = command or "python -m offline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_json(out / "config.json", {"build": config.to_dict(), "eval": asdict(eval_cfg), "seeds": list(seeds),
                                     "eval_dataset": asdict(eval_dataset) if eval_dataset else None,
                                     "command": command})
    per_seed, started, source = [], time.perf_counter(), provenance(command)
    for seed in seeds:
        cfg = seeded(config, seed)
        seed_dir = out / f"seed{seed}"
        seed_dir.mkdir(exist_ok=True)
        write_json(seed_dir / "build_config.json", cfg.to_dict())  # `python -m offline build --config` input
        t0 = time.perf_counter()
        shared_base = out / f"seed{seeds[0]}" / "store.work" / BASE_WEIGHTS_FILE  # BuildContext.base_weights
        with fixed_threads(cfg.threads):  # the oracles and scores, like the store, do not depend on the machine
            per_seed.append(evaluate_seed(cfg, seed, seed_dir, eval_cfg, eval_dataset, store_dir, device, progress,
                                          shared_base if store_dir is None else None))
        per_seed[-1]["wall_s"] = time.perf_counter() - t0
        # Everything is rewritten after each seed, marked incomplete until the last: a long run that is stopped
        # still leaves the summary of the seeds it finished (and says which).
        report = write_report(out, seeds, per_seed, source | {"wall_s": time.perf_counter() - started}, command)
    return report


def write_report(out: Path, seeds: Sequence[int], per_seed: list[dict], source: dict, command: str) -> Report:
    """Summary over the seeds done so far, and results.json / split.json / report.md / recall.png."""
    summary = {"average": mean_std_grid([r["average"] for r in per_seed]),
               "checks": {name: mean_std_grid([r["checks"][name] for r in per_seed]) for name in per_seed[0]["checks"]}}
    for section in ("wordings", "out_of_domain", "out_of_domain_descriptions"):
        if all(section in r for r in per_seed):
            summary[section] = mean_std_grid([r[section] for r in per_seed])
    summary["headline"] = headline(per_seed)
    done = [r["seed"] for r in per_seed]
    results = {"seeds": done, "seeds_asked": list(seeds), "complete": done == list(seeds),
               "provenance": source | {"load_average_at_end": list(os.getloadavg())},
               "summary": summary, "per_seed": per_seed}
    write_json(out / "split.json", {f"seed{r['seed']}": r["split"] for r in per_seed})
    write_json(out / "results.json", results)
    markdown = render_report(results, command)
    (out / "report.md").write_text(markdown)
    plot_summary(summary["average"], out / "recall.png")
    return Report(out, results, markdown)


def provenance(command: str) -> dict:
    """What a figure came from: the commit (and whether the tree was clean), the machine, threads; taken when the
    run starts (the run adds its wall time when it ends)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {"command": command, "commit": git("rev-parse", "HEAD"),
            "tree_clean": git("status", "--porcelain", "--untracked-files=no") is None,
            "machine": f"{platform.node()} {platform.machine()} {platform.platform()}", "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_start": list(os.getloadavg())}


def pooled_headroom(cases: Sequence[tuple[float, float, float]]) -> float:
    """100·(mean s − mean z)/(mean o − mean z) over (s, z, o) task cases."""
    s, z, o = (float(np.mean([c[i] for c in cases])) for i in range(3))
    return 100 * (s - z) / (o - z) if o > z else math.nan


def headline(per_seed: Sequence[dict]) -> dict:
    """The issue's figures for the served default over seeds: pooled over every task-seed, mean and worst seed."""
    def over_seeds(values: list[float], worst) -> dict:
        clean = [v for v in values if not math.isnan(v)]
        return {"mean": float(np.mean(clean)) if clean else math.nan, "worst seed": worst(clean) if clean else math.nan,
                "per seed": values}

    out = {}
    for row in ("default", "transfer_routed", "delta_merge", "sglora", "sglora_mean", *ceiling.ROWS):
        if row not in per_seed[0]["per_task"][next(iter(per_seed[0]["per_task"]))]:
            continue
        cases = [[(r[row][R1], r["zero_shot"][R1], r["oracle"][R1]) for r in seed["per_task"].values()]
                 for seed in per_seed]
        out[f"template: {row} headroom (pooled)"] = {"pooled over task-seeds": pooled_headroom(sum(cases, []))} | \
            over_seeds([pooled_headroom(c) for c in cases], min)
    if all("wordings_per_task" in seed for seed in per_seed):
        for row in ("default", "transfer_routed", "delta_merge", "topk_weighted"):
            cases = [[(w[row][R1], seed["per_task"][n]["zero_shot"][R1], seed["per_task"][n]["oracle"][R1])
                      for n, w in seed["wordings_per_task"].items() if row in w] for seed in per_seed]
            if all(cases):
                out[f"held-out wordings: {row} headroom (pooled)"] = {
                    "pooled over task-seeds": pooled_headroom(sum(cases, []))} | over_seeds(
                    [pooled_headroom(c) for c in cases], min)
        out["held-out wordings: gated %"] = over_seeds([s["wordings"]["default"]["gated %"] for s in per_seed], max)
        ood = [s["out_of_domain"]["all"] for s in per_seed]
        out["out-of-domain: gate fired %"] = over_seeds([o["gate fired %"] for o in ood], min)
        out["out-of-domain: served − zero-shot mR@1 (gate on)"] = over_seeds(
            [o["served − zero-shot (gate on)"] for o in ood], min)
        out["out-of-domain: served − zero-shot mR@1 (gate off)"] = over_seeds(
            [o["served − zero-shot (gate off)"] for o in ood], min)
    if all("semantic" in s["checks"] for s in per_seed):
        out["shuffled descriptions: default − zero-shot mR@1"] = over_seeds(
            [s["checks"]["semantic"]["default"]["shuffled description"] - s["average"]["zero_shot"][R1]
             for s in per_seed], max)
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")


# ------------------------------------------------------------------------------------------ rendering


def fmt(cell, digits: int = 1) -> str:
    mean, std = cell if isinstance(cell, (tuple, list)) else (cell, None)
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(grid: dict, first: str) -> str:
    """Percentages and points to one decimal; cosines (a column named so) to three."""
    columns = list(dict.fromkeys(c for row in grid.values() for c in row))
    digits = {c: 3 if "cosine" in c else 1 for c in columns}
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {r} | " + " | ".join(fmt(row.get(c, math.nan), digits[c]) for c in columns) + " |"
              for r, row in grid.items()]
    return "\n".join(lines)


CHECK_TITLES = {
    "semantic": "Check 1 — semantic path: true vs shuffled descriptions (mR@1)",
    "coverage": "Check 2 — coverage ablation: the most similar experts removed from routing (mR@1)",
    "spread": "Check 3 — spread over CVAE samples (mR@1 per sample, averaged over tasks)",
    "sweep": "Check 4 — K and τ sweep (mR@1)",
}


def render_report(results: dict, command: str) -> str:
    seeds, summary, per_seed = results["seeds"], results["summary"], results["per_seed"]
    n_tasks = [len(r["per_task"]) for r in per_seed]
    skipped = sum(len(r["headroom_skipped"]) for r in per_seed)
    parts = [
        "# SG-LoRA evaluation on unseen tasks",
        f"Command: `{command}`" + ("" if results.get("complete", True) else
                                    f" — **incomplete: seeds {seeds} of {results['seeds_asked']} done**"),
        f"Seeds {seeds} (mean ± std over seeds); {n_tasks} unseen tasks per seed; library of "
        f"{len(per_seed[0]['split']['seen'])} experts; held-out pairs per task: "
        f"{sorted(set(per_seed[0]['split']['held_out_pairs'].values()))}. Recall in %; a retrieved item is "
        "correct when its caption is the query's (held-out sets repeat captions); ties with wrong items count "
        "against the match. "
        f"mR@1 = mean of I2T and T2I R@1. headroom = (s − zero_shot)/(oracle − zero_shot) on mR@1, averaged over "
        f"tasks where the oracle gains ≥ the threshold ({skipped} task-seeds of {sum(n_tasks)} skipped); "
        f"headroom (pooled) = the same ratio on task-averaged mR@1.",
        "## Recall by strategy", markdown_table(summary["average"], "strategy"),
    ]
    if any(row in summary["average"] for row in ceiling.ROWS):
        parts.append(f"`{ceiling.HINDSIGHT}` and `{ceiling.ATTRIBUTES}` are ceilings, not strategies "
                     "(offline/routing_ceiling.py): the library expert that retrieves best on the task's held-out "
                     "pairs, chosen by looking at them, and the pick of a router told each task's attributes "
                     "instead of reading its description.")
    if "headline" in summary:
        parts += ["## Headline (served default unless named; pooled over task-seeds, mean and worst seed)",
                  markdown_table({r: {c: v for c, v in cells.items() if c != "per seed"}
                                  for r, cells in summary["headline"].items()}, "figure")]
    if "wordings" in summary:
        parts += ["## Held-out wordings of the unseen tasks (grammar templates the build never used)",
                  markdown_table(summary["wordings"], "strategy"),
                  "## Out-of-domain descriptions, each served for every unseen task (harm against zero-shot)",
                  markdown_table(summary["out_of_domain"], "set")]
    if "out_of_domain_descriptions" in summary:
        parts += ["## Each held-out out-of-domain description: the gate, and how close the base reads it to the "
                  "library (mean ± std over seeds)",
                  markdown_table(summary["out_of_domain_descriptions"], "description")]
    for name, grid in summary["checks"].items():
        parts += [f"## {CHECK_TITLES[name]}", markdown_table(grid, "")]
    parts.append("## Per task (mR@1; headroom in JSON)")
    for r in per_seed:
        grid = {t: {s: rows[s][R1] for s in rows} for t, rows in r["per_task"].items()}
        parts += [f"### seed {r['seed']}", markdown_table(grid, "task")]
    return "\n\n".join(parts) + "\n"


def plot_summary(average: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(average)
    metrics = [c for c in next(iter(average.values())) if "R@" in c and c != R1]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(strategies)), 4.5))
    for j, metric in enumerate(metrics):
        means = [average[s][metric][0] for s in strategies]
        stds = [average[s][metric][1] for s in strategies]
        ax.bar(np.arange(len(strategies)) + (j - (len(metrics) - 1) / 2) * width, means, width, yerr=stds,
               label=metric, capsize=2)
    ax.set_xticks(np.arange(len(strategies)), strategies, rotation=20)
    ax.set_ylabel("recall (%)")
    ax.set_title("Retrieval on unseen tasks (mean ± std over seeds)")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
