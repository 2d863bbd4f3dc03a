"""python -m bench.library: the expert library at scale (store format 2) and routing at scale.

(a) Library: synthetic stores of ViT-B/16 size (vision tower, r=2: D = 110,592) with E experts in float16 or
    float32 segments. Each store is opened in a fresh subprocess (so resident memory is the library's own):
    open time (model loading aside), resident memory after open and after N requests, aggregation p50/p95 (route
    to K=4 + gather the 4 rows + mixture moments). Baselines measured in the same run: the format-1 start-up cost
    of hashing every byte of the statistics (the `full-hash` column is what opening would cost if it re-hashed
    the library, as format 1 did), and aggregation over the same rows held in memory as float32 (1k only: 10k
    would need 8.8 GB of RAM).
(b) Routing: N synthetic description embeddings (width 512, clustered like text embeddings are: a new description
    lies near existing ones), the index `choose_index` picks for N (exact up to a threshold, IVF above with
    nprobe tuned at build time), single-query p50 and recall@4 against exact search on held-out queries, and the
    exact scan's p50 as the baseline.

Everything it writes goes under --dir (a temporary directory by default) and is removed at the end, also on
error or Ctrl-C. Run it niced and bounded:  nice -n 10 timeout 3000 python -m bench.library
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

VIT_B16_D = 110_592  # 12 blocks x 3 projections x (768x2 + 2x768)
EMB = 512  # ViT-B/16 text embedding width
CHUNK = 500  # experts written per update: bounds the RAM a 10k fp32 build needs to one chunk


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_split_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB: file pages are the mapped library, anonymous ones the heap."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, kb, _ = line.split()
                values[key] = int(kb) / 1024
    return values["RssAnon:"], values["RssFile:"]


def clustered_embeddings(n: int, seed: int, clusters: int | None = None) -> np.ndarray:
    """[n, 512] unit vectors around `clusters` random centres: descriptions of related tasks sit close together."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, n // 100)
    centres = rng.standard_normal((clusters, EMB), dtype=np.float32)
    out = np.empty((n, EMB), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: the temporaries of a million rows at once double the RAM
        stop = min(start + 100_000, n)
        block = centres[rng.integers(0, clusters, stop - start)]
        block += 0.8 * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


# ------------------------------------------------------------------------------------------- (a) library


def build_store(path: Path, n: int, dtype: str, seed: int = 0) -> float:
    """A synthetic ViT-B/16-sized store of n experts (written CHUNK experts per version); returns seconds."""
    from app.ml.aggregator import ExpertBank, build_index
    from app.ml.lora import LoRAConfig, layout_from_model_config
    from app.ml.store import NewExperts, update_store, write_store

    t0 = time.perf_counter()
    layout = layout_from_model_config("ViT-B-16", LoRAConfig())
    assert layout.D == VIT_B16_D
    generator = torch.Generator().manual_seed(seed)
    embeddings = clustered_embeddings(n, seed)
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        mu = torch.randn(rows, layout.D, generator=generator) * 0.02
        var = torch.rand(rows, layout.D, generator=generator) * 1e-4
        records = [{"id": f"expert-{start + i:07d}", "description": f"synthetic task {start + i}",
                    "provenance": {"synthetic": True}} for i in range(rows)]
        emb = embeddings[start : start + rows]
        if start == 0:
            bank = ExpertBank([r["id"] for r in records], [r["description"] for r in records], mu, var, emb,
                              build_index(emb))
            write_store(path, base_model={"name": "ViT-B-16", "pretrained": "openai", "weights_id": "tag:openai"},
                        lora_config=LoRAConfig(), layout=layout, bank=bank, experts=records, index_factory="auto",
                        dtype=dtype)
        else:
            update_store(path, add=NewExperts(records, mu, var, emb))
    return time.perf_counter() - t0


def measure_store(path: Path, requests: int, k: int, in_memory: bool) -> dict:
    """Runs in a fresh process (`--measure`): open, resident memory, aggregation latency."""
    from app.ml.aggregator import aggregate_experts
    from app.ml.routing_index import held_out_queries
    from app.ml.store import load_store, read_manifest

    torch.set_num_threads(1)
    read_manifest(path)  # imports and JSON machinery warm before the baseline RSS
    rss0 = rss_bytes()
    anon0, file0 = rss_split_mb()
    t0 = time.perf_counter()
    store = load_store(path, mmap_library=not in_memory)
    open_s = time.perf_counter() - t0
    rss_open = rss_bytes()
    queries = held_out_queries(store.bank.embeddings, requests, seed=1)
    times = []
    for q in queries:
        t = time.perf_counter()
        aggregate_experts(store.bank, q, k=k, tau=0.05)
        times.append(time.perf_counter() - t)
    rss_req = rss_bytes()
    warm = []  # the same requests again: every row they touch is verified already (first use hashes the row)
    for q in queries:
        t = time.perf_counter()
        aggregate_experts(store.bank, q, k=k, tau=0.05)
        warm.append(time.perf_counter() - t)
    anon, file = rss_split_mb()
    segments = store.manifest["library"]["segments"]
    t = time.perf_counter()  # the format-1 way: hash every byte of the statistics at start-up
    for s in segments:
        h = __import__("hashlib").sha256()
        with open(path / s["file"], "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    full_hash_s = time.perf_counter() - t
    return {"open_s": open_s, "rss_open_mb": (rss_open - rss0) / 2**20, "rss_requests_mb": (rss_req - rss0) / 2**20,
            "rss_requests_anon_mb": anon - anon0, "rss_requests_file_mb": file - file0,
            "p50_ms": 1e3 * statistics.median(times), "p95_ms": 1e3 * float(np.percentile(times, 95)),
            "warm_p50_ms": 1e3 * statistics.median(warm),
            "full_hash_s": full_hash_s, "bytes": sum(s["bytes"] for s in segments)}


def _measure_in_subprocess(path: Path, requests: int, k: int, in_memory: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.library", "--measure", str(path), "--requests", str(requests), "--k", str(k)]
    if in_memory:
        cmd.append("--in-memory")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_library(root: Path, sizes: list[int], dtypes: list[str], requests: int, k: int) -> list[dict]:
    rows = []
    for n in sizes:
        for dtype in dtypes:
            path = root / f"lib-{n}-{dtype}"
            build_s = build_store(path, n, dtype)
            row = {"experts": n, "dtype": dtype, "storage": "mmap", "build_s": build_s,
                   **_measure_in_subprocess(path, requests, k, in_memory=False)}
            rows.append(row)
            print(_library_row(row), flush=True)
            if n <= 1000 and dtype == "float32":
                base = {"experts": n, "dtype": dtype, "storage": "in-memory (baseline)", "build_s": build_s,
                        **_measure_in_subprocess(path, requests, k, in_memory=True)}
                rows.append(base)
                print(_library_row(base), flush=True)
            shutil.rmtree(path)
    return rows


LIB_HEADER = ("| experts | dtype | storage | on disk GB | open s | full-hash s (v1 start) | open / full-hash "
              "| RSS after open MB | RSS after requests MB (heap + mapped) | agg p50 ms | agg p95 ms "
              "| agg p50 ms, rows verified |\n" + "|---" * 12 + "|")


def _library_row(r: dict) -> str:
    return (f"| {r['experts']:,} | {r['dtype']} | {r['storage']} | {r['bytes'] / 1e9:.2f} | {r['open_s']:.3f} | "
            f"{r['full_hash_s']:.2f} | {r['open_s'] / r['full_hash_s']:.3f} | {r['rss_open_mb']:.0f} | "
            f"{r['rss_requests_mb']:.0f} ({r['rss_requests_anon_mb']:.0f} + {r['rss_requests_file_mb']:.0f}) | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['warm_p50_ms']:.2f} |")


# ------------------------------------------------------------------------------------------- (b) routing


def run_routing(sizes: list[int], queries: int, k: int) -> list[dict]:
    from app.ml.routing_index import fit_index, held_out_queries, recall_against_exact

    rows = []
    for n in sizes:
        embeddings = clustered_embeddings(n, seed=n)
        t0 = time.perf_counter()
        index, spec, _ = fit_index(embeddings, "auto", k)  # tunes nprobe on its own held-out queries (seed 0)
        build_s = time.perf_counter() - t0
        qs = held_out_queries(embeddings, queries, seed=7)  # other queries than the tuning ones
        recall = recall_against_exact(index, embeddings, qs, k)
        approx = _single_query_ms(lambda q, index=index: index.search(q, k), qs)
        exact = _single_query_ms(lambda q, emb=embeddings: faiss.knn(q, emb, k, metric=faiss.METRIC_INNER_PRODUCT),
                                 qs[:200])
        row = {"embeddings": n, "index": spec.factory, "search": spec.search or "-", "build_s": build_s,
               "p50_ms": approx, "exact_p50_ms": exact, f"recall@{k}": recall}
        rows.append(row)
        print(_routing_row(row, k), flush=True)
        del embeddings, index
    return rows


def _single_query_ms(search, queries: np.ndarray) -> float:
    for q in queries[:20]:  # warm-up
        search(q[None])
    times = []
    for q in queries:
        t = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


ROUTE_HEADER = ("| embeddings | index | search | build s | routing p50 ms | exact p50 ms (baseline) | speed-up "
                "| recall@4 vs exact |\n" + "|---" * 8 + "|")


def _routing_row(r: dict, k: int) -> str:
    return (f"| {r['embeddings']:,} | {r['index']} | {r['search']} | {r['build_s']:.1f} | {r['p50_ms']:.3f} | "
            f"{r['exact_p50_ms']:.3f} | {r['exact_p50_ms'] / r['p50_ms']:.1f}x | {r[f'recall@{k}']:.3f} |")


# ------------------------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.library", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=_ints, default=[1000, 10000], help="library sizes, e.g. 1000,10000")
    parser.add_argument("--dtypes", default="float16,float32", help="comma list of float16,float32")
    parser.add_argument("--embeddings", type=_ints, default=[100_000, 1_000_000], help="routing sizes")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="where stores are written (removed afterwards)")
    parser.add_argument("--sections", default="library,routing")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the subprocess side
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure_store(args.measure, args.requests, args.k, args.in_memory)))
        return 0

    faiss.omp_set_num_threads(1)  # single-query latency on a shared machine: one thread, as the service uses
    print(f"# sglora bench.library: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, faiss {faiss.__version__}, torch {torch.__version__}, CPU, 1 thread", flush=True)
    # `timeout` sends SIGTERM, whose default action skips `finally`: turn it into an exit so the stores are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="sglora-bench-library-", dir=args.dir))
    results = {}
    try:
        if "library" in args.sections:
            print(f"\n(a) expert library, ViT-B/16 size (D = {VIT_B16_D:,}), K = {args.k}, {args.requests} requests"
                  f"\n{LIB_HEADER}", flush=True)
            results["library"] = run_library(root, args.experts, args.dtypes.split(","), args.requests, args.k)
        if "routing" in args.sections:
            print(f"\n(b) routing, width {EMB}, top-{args.k}, {args.requests} held-out queries\n{ROUTE_HEADER}",
                  flush=True)
            results["routing"] = run_routing(args.embeddings, args.requests, args.k)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
