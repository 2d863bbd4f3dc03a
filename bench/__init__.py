"""Benchmarks: `python -m bench` prints tables of ratios against a bare baseline measured in the same run.

    lora_forward    per-sample LoRA (one adapter for all / N distinct adapters in one batch) vs the bare model,
                    the injected model under `no_lora()`, merged weights and attached (unmerged) weights
    generation      adapter generation latency per strategy vs the zero_shot baseline, on a built store
    cvae_sample     CVAE parameter count and sampling latency at ViT-B/16 size (D = 110,592), random init

Ratios, not absolute times, are the result: absolute times depend on the machine and on whatever else runs on it.
These are not tests; `tests/test_bench.py` only checks that the code path still runs.
"""
