"""Smoke tests for bench/: a tiny slice of each benchmark runs and yields sane rows, so the code cannot rot.
Nothing here is timed against a threshold; the numbers are `python -m bench`'s business."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from bench import cvae_sample, fewshot, generation, lora_forward
from bench.__main__ import main
from bench.timing import threads


@contextmanager
def threads_restored():
    """The benchmarks pin torch's and faiss's thread counts for the process they normally own; run in-process here,
    they must not leave every later test of the session at another thread count than when that test runs alone."""
    import faiss

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_lora_forward_and_cvae_benchmarks_run(capsys):
    with threads(1):  # as `python -m bench` does on CPU: two threads on two busy cores wait on each other
        rows = lora_forward.run(model="tiny_clip", batch_sizes=[2], repeats=2, min_time_s=0.0)
    assert {(r["encoder"], r["mode"]) for r in rows} == {(e, m) for e in lora_forward.ENCODERS
                                                         for m in lora_forward.MODES}
    assert all(_positive(r["ms"]) and _positive(r["ratio"]) for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["mode"] == "bare")
    assert "per_sample_N" in lora_forward.table(rows)

    with threads(1):
        rows = cvae_sample.run(D=3000, num_samples=[2], repeats=1)
    assert rows[0]["params"] > 0 and all(_positive(r["ms"]) for r in rows)
    assert "sample n=2" in cvae_sample.table(rows)

    assert main(["--model", "tiny", "--sections", "lora", "--batch-sizes", "1", "--repeats", "1", "--no-memory"]) == 0
    assert "(a) LoRA forward, tiny_clip" in capsys.readouterr().out


def test_generation_benchmark_runs_on_the_tiny_store(tiny_build):
    with threads(1):
        rows = generation.run(tiny_build.out, repeats=1)
    by_strategy = {r["strategy"]: r for r in rows}
    assert {"zero_shot", "topk_weighted", "sglora"} <= set(by_strategy)
    assert by_strategy["zero_shot"]["ratio"] == 1.0
    assert all(_positive(r["e2e_ms"]) and _positive(r["ratio"]) for r in rows)


def test_fewshot_benchmark_runs_on_the_tiny_store(tiny_build):
    with threads(1):
        rows = fewshot.run(tiny_build.out, n_examples=4, repeats=1, estimate_model="tiny_clip")
    served, fixed, estimate = rows
    assert served["steps"] >= 1 and _positive(served["seconds"])
    assert fixed["steps"] == fewshot.FIXED_STEPS and _positive(fixed["x_image_fwd_per_step"])
    assert estimate["model"] == "tiny_clip (estimate)" and _positive(estimate["seconds"])
    assert "(d) few-shot refinement" in fewshot.table(rows)


def test_library_benchmark_runs_small(tmp_path):
    from bench import library

    library.build_store(tmp_path / "lib", 3, "float16")  # ViT-B/16-sized rows, three of them
    with threads_restored():  # measure_store pins one thread for the subprocess it normally runs in
        row = library.measure_store(tmp_path / "lib", requests=4, k=2, in_memory=False)
    assert row["bytes"] > 3 * library.VIT_B16_D * 2 * 2 and _positive(row["p50_ms"]) and row["open_s"] > 0
    with threads_restored():  # run_routing leaves faiss at one OpenMP thread, as `python -m bench.library` wants
        routing = library.run_routing([300], queries=20, k=4)[0]
    assert routing["index"] == "Flat" and routing["recall@4"] == 1.0  # below the threshold: exact
    assert "| 300 | Flat |" in library._routing_row(routing, 4)
