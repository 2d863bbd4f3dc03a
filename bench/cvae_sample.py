"""The CVAE at ViT-B/16 size (vision tower, r=2, D = 110,592), random init: parameters and sampling latency.

Sampling is what a /generate-lora cache miss runs after routing: condition features over all chunks, the prior
p(z|c), then the decoder. The baseline is the top-K weighted merge (µ* = Σ α_k µ_k over K = 4 experts of the
same D), the cheapest strategy that builds the same condition, so "x merge" is what the CVAE adds on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.ml.backbone import resolve_device
from app.ml.cvae import CVAE, VIT_B16_R2_D, CVAEConfig, count_parameters, vit_b16_param_count
from bench.timing import format_table, time_interleaved

BUDGET = 30_000_000  # DESIGN decision 5


def run(
    device: str = "cpu",
    num_samples: Sequence[int] = (1, 8),
    repeats: int = 15,
    D: int = VIT_B16_R2_D,
    k: int = 4,
    seed: int = 0,
) -> list[dict]:
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    model = CVAE(CVAEConfig(D=D)).to(torch_device).eval()
    params = count_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    experts = (0.02 * torch.randn(k, D, generator=generator)).to(torch_device)
    alpha = torch.softmax(torch.randn(k, generator=generator), dim=0).to(torch_device)
    mu = alpha @ experts
    var = alpha @ experts.square() - mu.square() + 1e-4

    candidates = {"merge": lambda: alpha @ experts}
    for n in num_samples:
        candidates[f"sample n={n}"] = lambda n=n: model.sample(mu, var, num_samples=n, seed=seed)
        candidates[f"prior mean n={n}"] = lambda n=n: model.sample(mu, var, num_samples=n, use_prior_mean=True)
    with torch.inference_mode():
        seconds = time_interleaved(candidates, torch_device, repeats=repeats, warmup=2, min_time_s=0.02)
    rows = []
    for name, s in seconds.items():
        rows.append({
            "device": torch_device.type,
            "D": D,
            "params": params,
            "params_vit_b16": vit_b16_param_count(),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "op": name,
            "ms": 1e3 * s,
            "ratio": s / seconds["merge"],
        })
    return rows


def table(rows: Sequence[dict]) -> str:
    if not rows:
        return "cvae: no rows"
    r0 = rows[0]
    within = "within" if r0["params_vit_b16"] <= BUDGET else "OVER"
    title = (
        f"(c) CVAE, D={r0['D']:,} (ViT-B/16 vision, r=2), random init, {r0['device']}: "
        f"{r0['params']:,} parameters ({r0['weights_mib']:.1f} MiB fp32; vit_b16_param_count() = "
        f"{r0['params_vit_b16']:,}, {within} the {BUDGET / 1e6:.0f} M budget); x merge = time / top-4 weighted merge"
    )
    columns = [("op", "operation"), ("ms", "median ms"), ("ratio", "x merge")]
    return format_table(rows, columns, title)
