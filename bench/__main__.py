"""python -m bench [--model tiny_clip|ViT-B-16] [--device cpu|cuda|auto] [--store PATH] [--sections lora,...]

Prints one table per section. Defaults finish in about two minutes on two busy CPU cores; `--model ViT-B-16`
(random init, nothing downloaded) is the realistic size and wants a GPU (`--device cuda`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import cvae_sample, fewshot, generation, lora_forward
from bench.timing import threads

SECTIONS = ("lora", "generation", "cvae", "fewshot")
MODEL_ALIASES = {"tiny": "tiny_clip"}


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {text!r}")
    return values


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_clip", help="open_clip model for (a), random init (default tiny_clip)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32], help="for (a), e.g. 1,8,32")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per measurement (median)")
    parser.add_argument("--store", type=Path, default=generation.DEFAULT_STORE, help="model store for (b)")
    parser.add_argument("--sections", type=_sections, default=list(SECTIONS),
                        help="comma list of lora,generation,cvae,fewshot")
    parser.add_argument("--examples", type=int, default=8, help="for (d): examples per refinement (default 8)")
    parser.add_argument("--estimate-model", default="ViT-B-16",
                        help="for (d): the model whose refinement time is estimated from the measured ratio")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on CPU, where other processes compete for the cores "
                             "and a multi-threaded op waits for its slowest thread; torch's default on CUDA)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column of (a)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    model = MODEL_ALIASES.get(args.model, args.model)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")

    n_threads = args.threads
    if n_threads is None and not args.device.startswith("cuda"):
        n_threads = 1

    def repeats(default: int) -> int:
        return args.repeats if args.repeats is not None else default

    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    print(f"# sglora bench: torch {torch.__version__}, {platform.machine()}{load}, "
          f"{torch.get_num_threads() if n_threads is None else n_threads} torch threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") and torch.cuda.is_available()
             else ""), flush=True)
    results: dict[str, list[dict]] = {}
    with threads(n_threads):
        if "lora" in args.sections:
            t0 = time.perf_counter()
            results["lora"] = lora_forward.run(model=model, batch_sizes=args.batch_sizes, repeats=repeats(15),
                                               device=args.device, measure_memory=not args.no_memory)
            print(f"\n{lora_forward.table(results['lora'])}\n[{time.perf_counter() - t0:.0f} s]", flush=True)
        if "generation" in args.sections:
            if (args.store / "manifest.json").is_file():
                t0 = time.perf_counter()
                results["generation"] = generation.run(args.store, device=args.device, repeats=repeats(31))
                print(f"\n{generation.table(results['generation'])}\n[{time.perf_counter() - t0:.0f} s]", flush=True)
            else:
                print(f"\n(b) adapter generation: skipped, no model store at {args.store} "
                      f"(build one: python -m offline build --tiny --out {args.store})", flush=True)
        if "cvae" in args.sections:
            t0 = time.perf_counter()
            results["cvae"] = cvae_sample.run(device=args.device, repeats=repeats(15))
            print(f"\n{cvae_sample.table(results['cvae'])}\n[{time.perf_counter() - t0:.0f} s]", flush=True)
        if "fewshot" in args.sections:
            if (args.store / "manifest.json").is_file():
                t0 = time.perf_counter()
                results["fewshot"] = fewshot.run(args.store, n_examples=args.examples, device=args.device,
                                                 repeats=repeats(5), estimate_model=args.estimate_model or None)
                print(f"\n{fewshot.table(results['fewshot'])}\n[{time.perf_counter() - t0:.0f} s]", flush=True)
            else:
                print(f"\n(d) few-shot refinement: skipped, no model store at {args.store}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
