"""Few-shot refinement cost (app/ml/fewshot.py), against one image-tower forward of the examples.

On a built store (the tiny model): the served refinement of a description's adapter on N examples, as a request
pays it (default config: early stopping on the check half, so its step count varies), and the same refinement with
a fixed number of steps (patience = max_steps), timed per step. The unit is one image-tower forward of the N
examples with no adapter (`image fwd`): "x image fwd per step" = seconds per refinement step / that forward, which
depends little on the model's size because a step is a few forwards (and one backward) of both towers on the same
N examples. The ViT-B/16 estimate multiplies that ratio by a ViT-B/16 image-tower forward of N examples measured
in the same run (random init, nothing downloaded), times the default max_steps: an upper bound for a request
(early stopping usually ends sooner).

Examples are random pixels with distinct captions: the cost does not depend on what they show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from app.ml.backbone import load_backbone, resolve_device
from app.ml.fewshot import Examples, FewShotConfig, refine_routed
from app.ml.lora import inject_lora
from app.ml.store import load_store
from app.ml.strategies import GenerationRequest, default_strategy, generate_adapters
from bench.timing import format_table, time_interleaved

DESCRIPTION = "a photo of a red circle"
FIXED_STEPS = 10


def _examples(backbone, n: int, seed: int = 0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    pixels = torch.randn(n, 3, size, size, generator=g).to(backbone.device)
    tokens = backbone.tokenize([f"a photo number {i} of a red circle" for i in range(n)])
    return Examples(pixels, tokens)


def _image_forward_s(backbone, examples: Examples, device: torch.device, repeats: int) -> float:
    @torch.inference_mode()
    def forward() -> object:
        return backbone.encode_images(examples.pixels)

    return time_interleaved({"fwd": forward}, device, repeats=repeats, warmup=1)["fwd"]


def run(store_path: str | Path, n_examples: int = 8, device: str = "cpu", repeats: int = 5,
        estimate_model: str | None = "ViT-B-16") -> list[dict]:
    torch_device = resolve_device(device)
    store = load_store(Path(store_path))
    if store.cvae is not None:
        store.cvae.model.to(torch_device)
    backbone = load_backbone(store.base_model["name"], store.base_pretrained(), str(torch_device))
    layout = inject_lora(backbone.model, store.lora_config)
    strategy = default_strategy(store)
    request = GenerationRequest(query=backbone.encode_text([DESCRIPTION])[0].detach().cpu().numpy())
    start = generate_adapters(store, strategy, request).vectors[0]
    examples = _examples(backbone, n_examples)
    served = FewShotConfig()
    fixed = replace(served, max_steps=FIXED_STEPS, patience=FIXED_STEPS, time_budget_s=1e9)
    results = {}

    def refinement(config: FewShotConfig):
        def call() -> object:
            results[config.max_steps] = refine_routed(store, backbone, layout, strategy, request, start, examples,
                                                      config)
            return results[config.max_steps]
        return call

    seconds = time_interleaved({"served": refinement(served), "fixed": refinement(fixed)}, torch_device,
                               repeats=repeats, warmup=1)
    image_fwd = _image_forward_s(backbone, examples, torch_device, repeats=max(repeats, 5))
    per_step = seconds["fixed"] / FIXED_STEPS
    ratio = per_step / image_fwd
    rows = [{"model": store.base_model["name"], "examples": n_examples, "method": served.method,
             "run": "served (early stopping)", "steps": results[served.max_steps].steps,
             "seconds": seconds["served"], "image_fwd_ms": 1e3 * image_fwd, "per_step_ms": None,
             "x_image_fwd_per_step": None, "device": torch_device.type},
            {"model": store.base_model["name"], "examples": n_examples, "method": served.method,
             "run": f"{FIXED_STEPS} steps", "steps": FIXED_STEPS, "seconds": seconds["fixed"],
             "image_fwd_ms": 1e3 * image_fwd, "per_step_ms": 1e3 * per_step, "x_image_fwd_per_step": ratio,
             "device": torch_device.type}]
    if estimate_model:
        big = load_backbone(estimate_model, None, str(torch_device))
        big_fwd = _image_forward_s(big, _examples(big, n_examples), torch_device, repeats=3)
        rows.append({"model": f"{estimate_model} (estimate)", "examples": n_examples, "method": served.method,
                     "run": f"≤ {served.max_steps} steps", "steps": served.max_steps,
                     "seconds": ratio * big_fwd * served.max_steps, "image_fwd_ms": 1e3 * big_fwd,
                     "per_step_ms": 1e3 * ratio * big_fwd, "x_image_fwd_per_step": ratio,
                     "device": torch_device.type})
    return rows


def table(rows: Sequence[dict]) -> str:
    if not rows:
        return "fewshot: no rows"
    title = (f"(d) few-shot refinement of the routed adapter on {rows[0]['examples']} examples "
             f"({rows[0]['method']}), {rows[0]['device']}; image fwd = one image-tower forward of the examples, no "
             "adapter; the ViT-B/16 row = the measured ratio x its image fwd x max_steps (an upper bound)")
    columns = [("model", "model"), ("run", "run"), ("steps", "steps"), ("seconds", "seconds"),
               ("per_step_ms", "ms / step"), ("image_fwd_ms", "image fwd ms"),
               ("x_image_fwd_per_step", "x image fwd per step")]
    return format_table(rows, columns, title)
