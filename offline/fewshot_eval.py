"""Few-shot refinement offline: examples drawn from a task's training pairs, the refined adapter, and the choice of
method by held-out retrieval on the SEEN tasks (never the unseen ones).

`python -m offline fewshot-select` scores every method of app/ml/fewshot.py on seen tasks left out one at a time
(the task's own expert excluded from routing and from the candidates), n examples drawn from the task's training
pairs, mR@1 on its held-out pairs; the description-only adapter and the task's own expert beside them. The unseen
tasks' rows (1, 4, 8, 16 examples) are `python -m offline evaluate --examples 1 4 8 16` (offline/evaluate.py).

Routing for a left-out seen task uses the store's transfer router, which was fitted with that task in it (the
validation refits one per fold, offline/validate.py): that leak is the same for every method compared here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.ml.backbone import Backbone, load_backbone
from app.ml.fewshot import METHODS, Examples, FewShotConfig, Refinement, refine_routed
from app.ml.lora import LoRALayout, inject_lora
from app.ml.retrieval import embed_pairs, recall_at_k, same_caption_mask
from app.ml.store import Store, load_store
from app.ml.strategies import GenerationRequest, default_strategy, generate_adapters
from offline.config import BuildConfig
from offline.data import Pair
from offline.train_experts import describe, encode_pairs

logger = logging.getLogger(__name__)


def draw_examples(backbone: Backbone, pairs: Sequence[Pair], n: int, seed: int) -> Examples:
    """n example pairs drawn (seeded, without replacement) from a task's TRAINING pairs, preprocessed."""
    rng = np.random.default_rng(seed)
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)]
    pixels, tokens = encode_pairs(backbone, chosen)
    return Examples(pixels, tokens)


def refined_adapter(store: Store, backbone: Backbone, layout: LoRALayout, query: np.ndarray, examples: Examples,
                    config: FewShotConfig, seed: int = 0, exclude: Sequence[str] = ()) -> Refinement:
    """What the service serves for a description plus examples: the served default (gated) refined over the
    default strategy's routed candidates."""
    strategy = default_strategy(store)
    request = GenerationRequest(query=query, seed=seed, exclude=tuple(exclude))
    start = generate_adapters(store, strategy, request).vectors[0]
    return refine_routed(store, backbone, layout, strategy, request, start, examples, config)


@dataclass(frozen=True)
class HeldOutPairs:
    pixels: torch.Tensor
    tokens: torch.Tensor
    positives: torch.Tensor

    @classmethod
    def of(cls, backbone: Backbone, pairs: Sequence[Pair]) -> HeldOutPairs:
        pixels, tokens = encode_pairs(backbone, pairs)
        return cls(pixels, tokens, same_caption_mask([p.caption for p in pairs]))

    def mr1(self, backbone: Backbone, layout: LoRALayout, adapter: torch.Tensor | None) -> float:
        images, texts = embed_pairs(backbone, layout, adapter, self.pixels, self.tokens)
        recall = recall_at_k(images @ texts.T, (1,), self.positives)
        return (recall["i2t"][1] + recall["t2i"][1]) / 2


def select_method(store: Store, backbone: Backbone, layout: LoRALayout, seen: Sequence, test_pairs: dict,
                  counts: Sequence[int], configs: dict[str, FewShotConfig], seed: int,
                  progress: bool = True) -> dict:
    """Per (variant, n): mean mR@1 over the seen tasks, left out one at a time, beside the description-only
    adapter and the tasks' own experts; pooled headroom = (variant − zero-shot) / (own expert − zero-shot)."""
    per_task: dict[str, dict[str, float]] = {}
    seconds: dict[str, list[float]] = {}
    for task in tqdm(seen, desc=f"seed {seed}: seen tasks (few-shot selection)", disable=not progress):
        held = HeldOutPairs.of(backbone, test_pairs[task.name])
        query = describe(backbone, [task.description])[0].cpu().numpy()
        own = store.bank.gather([store.bank.row_of(task.name)])[0][0]
        start = generate_adapters(store, default_strategy(store),
                                  GenerationRequest(query=query, seed=seed, exclude=(task.name,))).vectors[0]
        row = {"zero_shot": held.mr1(backbone, layout, None), "description only": held.mr1(backbone, layout, start),
               "own expert": held.mr1(backbone, layout, own)}
        for n in counts:
            examples = draw_examples(backbone, task.pairs, n, seed)
            for name, config in configs.items():
                result = refined_adapter(store, backbone, layout, query, examples, replace(config, seed=seed), seed,
                                         exclude=(task.name,))
                row[f"{name} n={n}"] = held.mr1(backbone, layout, result.vector)
                seconds.setdefault(f"{name} n={n}", []).append(result.seconds)
        per_task[task.name] = row
    columns = list(next(iter(per_task.values())))
    mean = {c: float(np.mean([r[c] for r in per_task.values()])) for c in columns}
    z, o = mean["zero_shot"], mean["own expert"]
    summary = {c: {"mR@1": mean[c], "headroom (pooled)": 100 * (mean[c] - z) / (o - z) if o > z else float("nan"),
                   "seconds (mean)": float(np.mean(seconds[c])) if c in seconds else float("nan")} for c in columns}
    return {"seed": seed, "tasks": list(per_task), "summary": summary, "per_task": per_task}


def variants(methods: Sequence[str] = METHODS) -> dict[str, FewShotConfig]:
    return {m: FewShotConfig(method=m) for m in methods}


def run_selection(config: BuildConfig, out: Path, seeds: Sequence[int], counts: Sequence[int],
                  methods: Sequence[str] = METHODS, max_tasks: int | None = None, device: str = "cpu",
                  progress: bool = True) -> dict:
    """Reuses (or builds) <out>/seed<i>/store exactly as `offline evaluate` does; writes fewshot_selection.json."""
    from offline.evaluate import ensure_store, seeded

    out = Path(out)
    per_seed = []
    for seed in seeds:
        ctx = ensure_store(seeded(config, seed), out / f"seed{seed}" / "store", progress)
        store = load_store(ctx.out)
        backbone = load_backbone(store.base_model["name"], store.base_pretrained(), device)
        layout = inject_lora(backbone.model, store.lora_config)
        seen = ctx.split.seen[:max_tasks]
        t0 = time.perf_counter()
        per_seed.append(select_method(store, backbone, layout, seen, ctx.split.test_pairs, counts,
                                      variants(methods), seed, progress) | {"wall_s": time.perf_counter() - t0})
    columns = list(per_seed[0]["summary"])
    summary = {c: {k: float(np.mean([r["summary"][c][k] for r in per_seed])) for k in per_seed[0]["summary"][c]}
               for c in columns}
    result = {"criterion": "mR@1 on seen tasks' held-out pairs, each task left out of routing and candidates",
              "seeds": list(seeds), "counts": list(counts),
              "configs": {m: asdict(c) for m, c in variants(methods).items()},
              "summary": summary, "per_seed": per_seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fewshot_selection.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
