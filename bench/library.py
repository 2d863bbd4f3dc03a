"""python -m bench.library: the expert library at scale (store format 2): does a request cost more as E grows?

(a) Library: synthetic stores of ViT-B/16 size (vision tower, r=2: D = 110,592) with E experts in float16 or
    float32 segments (a size that does not fit on the disk is skipped and says so). Each store is opened in a
    fresh subprocess (so resident memory is the library's own): open time, resident memory after open and after N
    requests, aggregation p50/p95 (route to K=4 + gather the 4 rows, each verified on first read + mixture
    moments), and the transfer router's top-K: through its gain index and exhaustively (the previous way, a
    prediction for every expert; a synthetic router shaped like a validated one). Baselines in the same run: the
    format-1 start-up cost of hashing every byte (up to 10k), aggregation over rows held in memory (1k fp32).
(c) Server: the built tiny store grown to the same E (noisy copies of its experts, its validated routing kept),
    the app in-process in a fresh subprocess, uncached POST /generate-lora (new description and seed each time).
    A summary table puts (a) and (c) side by side against E, with ratios to the smallest size.
(b) Routing: N synthetic description embeddings (width 512, clustered like text embeddings are: a new description
    lies near existing ones), the index `choose_index` picks for N (exact, HNSW, IVF-PQ with exact re-ranking,
    search breadth tuned at build time), build time, single-query p50 and recall@4 against exact search on
    held-out queries, and the exact scan's p50 as the baseline.

Everything it writes goes under --dir (a temporary directory by default) and is removed at the end, also on
error, Ctrl-C or SIGTERM. Run it niced and bounded:  nice -n 10 timeout 3000 python -m bench.library
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


def disk_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page-cache misses, readahead included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


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


class _SyntheticLibrary:
    """Rows of a synthetic library made on demand: `write_store` gathers and writes them one segment at a time, so a
    100k-expert store (44 GB in fp16) is written in one version without holding it. Generated a block at a time (a
    block seeded by its first row) and scaled in place: per-row tensors cost more in allocation than in numbers."""

    def __init__(self, n: int, D: int, seed: int):
        self.shape, self.seed = (n, D), seed

    def gather(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        rows = list(rows)
        generator = torch.Generator().manual_seed(self.seed * 10**8 + int(rows[0]))
        mu = torch.randn(len(rows), self.shape[1], generator=generator).mul_(0.02)
        return mu, torch.rand(len(rows), self.shape[1], generator=generator).mul_(1e-4)


class _SyntheticRows:
    """`bank.mu` / `bank.var` of a synthetic library: ExpertBank.gather reads rows through `.library`."""

    ndim = 2

    def __init__(self, library: _SyntheticLibrary):
        self.library, self.shape = library, torch.Size(library.shape)


def library_layout(model: str):
    import app.ml.backbone  # noqa: F401  registers the bundled open_clip configs (tiny_clip)
    from app.ml.lora import LoRAConfig, layout_from_model_config

    layout = layout_from_model_config(model, LoRAConfig())
    assert model != "ViT-B-16" or layout.D == VIT_B16_D
    return layout


def build_store(path: Path, n: int, dtype: str, seed: int = 0, model: str = "ViT-B-16") -> float:
    """A synthetic store of n experts with `model`'s LoRA layout (ViT-B/16: D = 110,592), written as one version;
    returns seconds. Embeddings are 512-wide whatever the model, so routing costs what it costs at ViT-B/16."""
    from app.ml.aggregator import ExpertBank
    from app.ml.lora import LoRAConfig
    from app.ml.store import write_store

    t0 = time.perf_counter()
    layout = library_layout(model)
    embeddings = clustered_embeddings(n, seed)
    rows = _SyntheticRows(_SyntheticLibrary(n, layout.D, seed))
    records = [{"id": f"expert-{i:07d}", "description": f"synthetic task {i}", "provenance": {"synthetic": True}}
               for i in range(n)]
    # The routing index over the embeddings is built once, after the rows: `write_store` picks it by size.
    bank = ExpertBank([r["id"] for r in records], [r["description"] for r in records], rows, rows, embeddings,
                      _NoIndex(n))
    write_store(path, base_model={"name": model, "pretrained": None, "weights_id": "synthetic"},
                lora_config=LoRAConfig(), layout=layout, bank=bank, experts=records, index_factory="auto", dtype=dtype)
    return time.perf_counter() - t0


class _NoIndex:
    """Stands in for the bank's index while writing: write_store builds the store's own from the embeddings."""

    def __init__(self, n: int):
        self.ntotal = n


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
    times, read0 = [], disk_read_bytes()
    for q in queries:
        t = time.perf_counter()
        aggregate_experts(store.bank, q, k=k, tau=0.05)
        times.append(time.perf_counter() - t)
    disk_mb_per_request = (disk_read_bytes() - read0) / 2**20 / len(queries)
    rss_req = rss_bytes()
    warm = []  # the same requests again: every row they touch is verified already (first use hashes the row)
    for q in queries:
        t = time.perf_counter()
        aggregate_experts(store.bank, q, k=k, tau=0.05)
        warm.append(time.perf_counter() - t)
    anon, file = rss_split_mb()
    segments = store.manifest["library"]["segments"]
    full_hash_s = float("nan")
    if len(store.bank) <= FULL_HASH_UP_TO:
        t = time.perf_counter()  # the format-1 way: hash every byte of the statistics at start-up
        for s in segments:
            h = __import__("hashlib").sha256()
            with open(path / s["file"], "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        full_hash_s = time.perf_counter() - t
    return router_timings(store.bank.embeddings, requests, k) | {
        "open_s": open_s, "rss_open_mb": (rss_open - rss0) / 2**20, "rss_requests_mb": (rss_req - rss0) / 2**20,
        "rss_requests_anon_mb": anon - anon0, "rss_requests_file_mb": file - file0,
        "disk_mb_per_request": disk_mb_per_request,
        "p50_ms": 1e3 * statistics.median(times), "p95_ms": 1e3 * float(np.percentile(times, 95)),
        "warm_p50_ms": 1e3 * statistics.median(warm), "full_hash_s": full_hash_s,
        "bytes": sum(s["bytes"] for s in segments)}


FULL_HASH_UP_TO = 10_000  # the format-1 baseline re-hashes every byte: minutes of disk reads at 100k, skipped
ROUTER_TASKS, ROUTER_FIT_EXPERTS = 40, 500  # synthetic transfer router: seen tasks x experts it was fitted on


def synthetic_router(embeddings: np.ndarray, seed: int = 0):
    """A linear-kernel transfer router shaped like a validated one (40 seen tasks, fitted on 500 of the experts,
    predicting for all of them), with random dual coefficients: its cost, not its quality, is measured."""
    from app.ml.routing_index import held_out_queries
    from app.ml.transfer_router import TransferRouter, features, whitener

    rng = np.random.default_rng(seed)
    fitted = embeddings[np.sort(rng.choice(len(embeddings), min(len(embeddings), ROUTER_FIT_EXPERTS), replace=False))]
    tasks = held_out_queries(embeddings, ROUTER_TASKS, seed=seed + 2)
    mean, whiten = whitener(tasks, 1.0)
    return TransferRouter(features(tasks, mean, whiten), features(fitted, mean, whiten),
                          rng.normal(size=(ROUTER_TASKS, len(fitted))), mean, whiten, 0.0, 0.0, 0.1, 1.0)


def router_timings(embeddings: np.ndarray, requests: int, k: int) -> dict:
    """The transfer router's top-k per request: through its gain index (built once, timed) and exhaustively (the
    previous way: a prediction for every expert, then a sort; fewer requests at large E, it takes seconds)."""
    from app.ml.gain_index import GainIndex
    from app.ml.routing_index import held_out_queries

    router = synthetic_router(embeddings)
    t = time.perf_counter()
    index = GainIndex(router, embeddings)
    build_s = time.perf_counter() - t
    queries = held_out_queries(embeddings, requests, seed=5)
    indexed = []
    for q in queries:
        t = time.perf_counter()
        index.top(q, k)
        indexed.append(time.perf_counter() - t)
    exhaustive, agree = [], []
    for q in queries[: max(3, min(requests, 100_000 // len(embeddings)))]:
        t = time.perf_counter()
        top = np.argsort(-router.predict(q, embeddings), kind="stable")[:k]
        exhaustive.append(time.perf_counter() - t)
        agree.append(len(set(top.tolist()) & set(index.top(q, k)[0].tolist())) / k)
    return {"router_p50_ms": 1e3 * statistics.median(indexed), "router_exhaustive_p50_ms":
            1e3 * statistics.median(exhaustive), "router_agree": float(np.mean(agree)), "gain_index_s": build_s}


def _measure_in_subprocess(path: Path, requests: int, k: int, in_memory: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.library", "--measure", str(path), "--requests", str(requests), "--k", str(k)]
    if in_memory:
        cmd.append("--in-memory")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_library(root: Path, sizes: list[int], dtypes: list[str], requests: int, k: int,
                model: str = "ViT-B-16") -> list[dict]:
    rows, D = [], library_layout(model).D
    for n in sizes:
        for dtype in dtypes:
            path = root / f"lib-{n}-{dtype}"
            need, free = 2 * n * D * np.dtype(dtype).itemsize, shutil.disk_usage(root).free
            if need + DISK_MARGIN > free:  # the disk is shared: never fill it
                print(f"| {n:,} | {dtype} | skipped: needs {need / 1e9:.1f} GB + {DISK_MARGIN / 1e9:.0f} GB margin, "
                      f"{free / 1e9:.1f} GB free |", flush=True)
                continue
            build_s = build_store(path, n, dtype, model=model)
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


DISK_MARGIN = 15e9  # bytes left free beside a synthetic library


LIB_HEADER = ("| experts | dtype | storage | on disk GB | open s | full-hash s (v1 start) | open / full-hash "
              "| RSS after open MB | RSS after requests MB (heap + mapped) | agg p50 ms | agg p95 ms "
              "| agg p50 ms, rows verified | disk MB read per request | router top-K p50 ms (index) "
              "| router p50 ms (exhaustive) |\n" + "|---" * 15 + "|")


def _library_row(r: dict) -> str:
    return (f"| {r['experts']:,} | {r['dtype']} | {r['storage']} | {r['bytes'] / 1e9:.2f} | {r['open_s']:.3f} | "
            f"{r['full_hash_s']:.2f} | {r['open_s'] / r['full_hash_s']:.3f} | {r['rss_open_mb']:.0f} | "
            f"{r['rss_requests_mb']:.0f} ({r['rss_requests_anon_mb']:.0f} + {r['rss_requests_file_mb']:.0f}) | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['warm_p50_ms']:.2f} | {r['disk_mb_per_request']:.2f} | "
            f"{r['router_p50_ms']:.3f} | {r['router_exhaustive_p50_ms']:.1f} |")


# ------------------------------------------------------------------------------------------- (c) server

SERVER_CHUNK = 20_000  # experts added per update when growing the tiny store


def grow_tiny_store(base: Path, path: Path, n: int, seed: int = 0) -> float:
    """A copy of a built tiny store (`python -m offline build --tiny`) grown to n experts by noisy copies of its own
    experts; returns seconds. Its validated routing is recorded again as current: the router, fitted on the original
    experts, predicts a gain for any expert embedding, so the served path (transfer router, gate, CVAE on the
    router's prior) is the one a validated store of n experts takes."""
    from app.ml.store import ROUTING_ARTIFACT, NewExperts, load_store, update_store, write_artifact

    t0 = time.perf_counter()
    shutil.copytree(base, path)
    store = load_store(path)
    tensors, entry = store.artifact(ROUTING_ARTIFACT)
    bank, rng = store.bank, np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    for start in range(len(bank), n, SERVER_CHUNK):
        src = rng.integers(0, len(bank), min(SERVER_CHUNK, n - start))
        mu = bank.mu[src] + 0.1 * bank.mu.std() * torch.randn(len(src), bank.mu.shape[1], generator=generator)
        emb = bank.embeddings[src] + 0.3 * rng.standard_normal((len(src), bank.embeddings.shape[1])).astype(np.float32)
        records = [{"id": f"synthetic-{start + i:07d}", "description": f"{bank.descriptions[r]} (variant {start + i})",
                    "provenance": {"synthetic": True}} for i, r in enumerate(src.tolist())]
        update_store(path, add=NewExperts(records, mu, bank.var[src].clone(),
                                          emb / np.linalg.norm(emb, axis=1, keepdims=True)))
    write_artifact(path, ROUTING_ARTIFACT, tensors, entry["record"])
    return time.perf_counter() - t0


def measure_server(path: Path, requests: int) -> dict:
    """Runs in a fresh process (`--serve`): the app in-process (its lifespan loads and warms the store), then
    uncached POST /generate-lora (every request a new description and seed: a cache miss), timed around the call."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    torch.set_num_threads(1)
    rss0 = rss_bytes()
    settings = Settings(store_path=path, device="cpu", playground=False, log_level="WARNING")
    with TestClient(create_app(settings)) as client:
        times = []
        for i in range(requests + 3):  # the first three warm the text tower's code paths
            body = {"description": f"a photo of a red circle, variant {i}", "seed": i}
            t = time.perf_counter()
            response = client.post("/generate-lora", json=body)
            elapsed = time.perf_counter() - t
            if response.status_code != 200 or response.headers.get("X-Cache") != "miss":
                raise RuntimeError(f"/generate-lora answered {response.status_code} {response.text[:300]}")
            times.append(elapsed)
        times = times[3:]
    return {"server_p50_ms": 1e3 * statistics.median(times), "server_p95_ms": 1e3 * float(np.percentile(times, 95)),
            "server_rss_mb": (rss_bytes() - rss0) / 2**20}


def run_server(root: Path, base: Path, sizes: list[int], requests: int) -> list[dict]:
    rows = []
    for n in sizes:
        path = root / f"tiny-{n}"
        grow_s = grow_tiny_store(base, path, n)
        cmd = [sys.executable, "-m", "bench.library", "--serve", str(path), "--requests", str(requests)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        row = {"experts": n, "grow_s": grow_s, **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"| {n:,} | {row['server_p50_ms']:.1f} | {row['server_p95_ms']:.1f} | {row['server_rss_mb']:.0f} |",
              flush=True)
        shutil.rmtree(path)
    return rows


SERVER_HEADER = "| experts | server p50 ms | server p95 ms | RSS MB |\n|---|---|---|---|"


# ------------------------------------------------------------------------------------------- summary


def summary(library: list[dict], server: list[dict]) -> str:
    """One table against E: the ViT-B/16 library (fp16, mmap) beside the tiny server's uncached /generate-lora."""
    by_n = {r["experts"]: r for r in library if r["storage"] == "mmap" and r["dtype"] == "float16"}
    serve = {r["experts"]: r for r in server}
    sizes = sorted(set(by_n) | set(serve))
    base_lib, base_srv = by_n.get(min(by_n, default=0)), serve.get(min(serve, default=0))
    lines = ["| experts | on disk GB (fp16) | open s | RSS after requests MB | agg p50 ms | agg p95 ms | agg p50 / "
             "smallest | router top-K p50 ms (index) | router p50 ms (exhaustive, before) | router top-K = exhaustive "
             "| /generate-lora p50 ms (tiny, uncached) | p95 ms | server p50 / smallest |", "|---" * 13 + "|"]
    for n in sizes:
        lib, srv = by_n.get(n), serve.get(n)
        cells = [f"{n:,}"]
        if lib:
            cells += [f"{lib['bytes'] / 1e9:.2f}", f"{lib['open_s']:.3f}", f"{lib['rss_requests_mb']:.0f}",
                      f"{lib['p50_ms']:.2f}", f"{lib['p95_ms']:.2f}", f"{lib['p50_ms'] / base_lib['p50_ms']:.2f}",
                      f"{lib['router_p50_ms']:.3f}", f"{lib['router_exhaustive_p50_ms']:.1f}",
                      f"{lib['router_agree']:.3f}"]
        else:
            cells += ["-"] * 9
        if srv:
            cells += [f"{srv['server_p50_ms']:.1f}", f"{srv['server_p95_ms']:.1f}",
                      f"{srv['server_p50_ms'] / base_srv['server_p50_ms']:.2f}"]
        else:
            cells += ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- (b) routing


def run_routing(sizes: list[int], queries: int, k: int) -> list[dict]:
    from app.ml.routing_index import fit_index, held_out_queries, recall_against_exact

    rows = []
    for n in sizes:
        embeddings = clustered_embeddings(n, seed=n)
        faiss.omp_set_num_threads(BUILD_THREADS)
        t0 = time.perf_counter()
        index, spec, _ = fit_index(embeddings, "auto", k)  # tunes its breadth on its own held-out queries (seed 0)
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        index_mb = faiss.serialize_index(index).nbytes / 2**20
        qs = held_out_queries(embeddings, queries, seed=7)  # other queries than the tuning ones
        recall = recall_against_exact(index, embeddings, qs, k)
        approx = _single_query_ms(lambda q, index=index: index.search(q, k), qs)
        exact = _single_query_ms(lambda q, emb=embeddings: faiss.knn(q, emb, k, metric=faiss.METRIC_INNER_PRODUCT),
                                 qs[:200])
        row = {"embeddings": n, "index": spec.factory, "search": spec.search or "-", "build_s": build_s,
               "index_mb": index_mb, "p50_ms": approx, "exact_p50_ms": exact, f"recall@{k}": recall}
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


BUILD_THREADS = 2  # the index build may use both cores (the target is <= 120 s on 2); queries run on one


ROUTE_HEADER = (f"| embeddings | index | search | build s ({BUILD_THREADS} threads) | index MB | routing p50 ms "
                "| exact p50 ms (baseline) | speed-up | recall@4 vs exact |\n" + "|---" * 9 + "|")


def _routing_row(r: dict, k: int) -> str:
    return (f"| {r['embeddings']:,} | {r['index']} | {r['search']} | {r['build_s']:.1f} | {r['index_mb']:.0f} | "
            f"{r['p50_ms']:.3f} | "
            f"{r['exact_p50_ms']:.3f} | {r['exact_p50_ms'] / r['p50_ms']:.1f}x | {r[f'recall@{k}']:.3f} |")


# ------------------------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.library", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=_ints, default=[1000, 10_000, 100_000],
                        help="library sizes (a size whose store does not fit on the disk is skipped, and says so)")
    parser.add_argument("--model", default="ViT-B-16",
                        help="LoRA layout of the synthetic library rows (tiny_clip: D = 3,072, for a quick E-curve)")
    parser.add_argument("--dtypes", default="float16,float32", help="comma list of float16,float32")
    parser.add_argument("--embeddings", type=_ints, default=[100_000, 1_000_000], help="routing sizes")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None, help="where stores are written (removed afterwards)")
    parser.add_argument("--sections", default="library,server,routing")
    parser.add_argument("--tiny-store", type=Path, default=None,
                        help="a built tiny store (python -m offline build --tiny) for the server section")
    parser.add_argument("--server-requests", type=int, default=50)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the subprocess side
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure_store(args.measure, args.requests, args.k, args.in_memory)))
        return 0
    if args.serve is not None:
        print(json.dumps(measure_server(args.serve, args.requests)))
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
            print(f"\n(a) expert library, {args.model} LoRA size (D = {library_layout(args.model).D:,}), K = {args.k}, "
                  f"{args.requests} requests"
                  f"\n{LIB_HEADER}", flush=True)
            results["library"] = run_library(root, args.experts, args.dtypes.split(","), args.requests, args.k,
                                             args.model)
        if "server" in args.sections:
            if args.tiny_store is None:
                parser.error("the server section needs --tiny-store (or leave it out of --sections)")
            print(f"\n(c) uncached POST /generate-lora, tiny model, store grown from {args.tiny_store.name}, "
                  f"{args.server_requests} requests\n{SERVER_HEADER}", flush=True)
            results["server"] = run_server(root, args.tiny_store, args.experts, args.server_requests)
        print(f"\nagainst E (one run)\n{summary(results.get('library', []), results.get('server', []))}", flush=True)
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
