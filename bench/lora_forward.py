"""Cost of serving LoRA per sample, against the bare model, in one run.

Modes, for encode_images and encode_text at each batch size N (LoRA on q/k/v of both towers, rank from LoRAConfig):

    bare            the open_clip model with no LoRA injected: the baseline every ratio divides by
    no_lora         LoRA injected, forward under `no_lora()` (what routing uses): the wrappers' own overhead
    merged          one adapter merged into in_proj_weight (a worker owning its model copy): no extra work per call
    attached        one adapter in the wrappers' own parameters, unmerged (the training path)
    per_sample_1    `per_sample_lora` with one adapter for the whole batch (what /retrieve does)
    per_sample_N    `per_sample_lora` with N distinct adapters, one per sample, in one batch

Per-sample timings include entering the context (gathering each sample's factors), as a request pays it.
"x no_lora" isolates the LoRA arithmetic: no_lora runs the same attention code (F.linear + scaled_dot_product_attention)
without it, while "bare" is open_clip's stock nn.MultiheadAttention, a different kernel path that can be slower or
faster than the wrapper on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from app.ml.backbone import load_backbone, resolve_device
from app.ml.lora import LoRAConfig, inject_lora, merge_lora, no_lora, per_sample_lora, vector_to_lora
from bench.timing import format_table, memory_method, mib, peak_memory_bytes, time_interleaved

MODES = ("bare", "no_lora", "merged", "attached", "per_sample_1", "per_sample_N")
ENCODERS = ("image", "text")
TOWERS = ("vision", "text")


def _inputs(backbone, encoder: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if encoder == "image":
        size = backbone.image_size
        return torch.randn(n, 3, size, size, generator=generator).to(backbone.device)
    words = ["red", "green", "blue", "small", "large", "circle", "square", "triangle", "photo", "background"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) for i in range(n)]
    return backbone.tokenize([f"a photo of a {t}" for t in texts])


def run(
    model: str = "tiny_clip",
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 15,
    device: str = "cpu",
    encoders: Sequence[str] = ENCODERS,
    rank: int = 2,
    measure_memory: bool = True,
    seed: int = 0,
    min_time_s: float = 0.05,
) -> list[dict]:
    """One row per (encoder, batch size, mode): median ms, ratio to bare, peak memory and its ratio to bare."""
    for e in encoders:
        if e not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {e!r}")
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    bare = load_backbone(model, pretrained=None, device=str(torch_device))  # random init: no download
    adapted_model = copy.deepcopy(bare.model)
    config = LoRAConfig(rank=rank, towers=TOWERS)
    layout = inject_lora(adapted_model, config)
    generator = torch.Generator().manual_seed(seed)
    max_n = max(batch_sizes)
    # Adapter-sized values (B != 0), so no path can skip work because the adapter is zero.
    bank = (0.02 * torch.randn(max_n, layout.D, generator=generator)).to(torch_device)
    vector_to_lora(adapted_model, bank[0])
    merged_model = copy.deepcopy(adapted_model)
    merge_lora(merged_model)

    def forward(m: torch.nn.Module, encoder: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return m.encode_image if encoder == "image" else m.encode_text

    rows: list[dict] = []
    with torch.inference_mode():
        for encoder in encoders:
            for n in batch_sizes:
                x = _inputs(bare, encoder, n, generator)
                f_bare, f_adapted, f_merged = (forward(m, encoder) for m in (bare.model, adapted_model, merged_model))
                one = bank[:1]
                index_one = torch.zeros(n, dtype=torch.long, device=torch_device)
                many = bank[:n]
                index_many = torch.arange(n, device=torch_device)

                def run_no_lora(f=f_adapted, x=x):
                    with no_lora():
                        return f(x)

                def run_ps1(f=f_adapted, x=x, one=one, index=index_one):
                    with per_sample_lora(layout, one, index):
                        return f(x)

                def run_psn(f=f_adapted, x=x, many=many, index=index_many):
                    with per_sample_lora(layout, many, index):
                        return f(x)

                candidates = {
                    "bare": lambda f=f_bare, x=x: f(x),
                    "no_lora": run_no_lora,
                    "merged": lambda f=f_merged, x=x: f(x),
                    "attached": lambda f=f_adapted, x=x: f(x),
                    "per_sample_1": run_ps1,
                    "per_sample_N": run_psn,
                }
                seconds = time_interleaved(candidates, torch_device, repeats=repeats, warmup=2, min_time_s=min_time_s)
                peaks = (
                    {k: peak_memory_bytes(fn, torch_device) for k, fn in candidates.items()}
                    if measure_memory
                    else dict.fromkeys(candidates)
                )
                for mode in MODES:
                    peak, base_peak = peaks[mode], peaks["bare"]
                    rows.append({
                        "model": model,
                        "device": torch_device.type,
                        "encoder": encoder,
                        "batch": n,
                        "mode": mode,
                        "ms": 1e3 * seconds[mode],
                        "ratio": seconds[mode] / seconds["bare"],
                        "ratio_no_lora": seconds[mode] / seconds["no_lora"],
                        "peak_mib": mib(peak),
                        "peak_ratio": peak / base_peak if peak is not None and base_peak else None,
                    })
    return rows


def table(rows: Sequence[dict]) -> str:
    if not rows:
        return "lora_forward: no rows"
    r0 = rows[0]
    device = torch.device(r0["device"])
    title = (
        f"(a) LoRA forward, {r0['model']} (random init), {r0['device']}, LoRA r=2 on q/k/v of both towers; "
        f"x bare / x no_lora = median time / that mode's median time; peak = {memory_method(device)}, one call"
    )
    columns = [("encoder", "encoder"), ("batch", "N"), ("mode", "mode"), ("ms", "median ms"), ("ratio", "x bare"),
               ("ratio_no_lora", "x no_lora"), ("peak_mib", "peak MiB"), ("peak_ratio", "peak x bare")]
    return format_table(rows, columns, title)
