"""Load against a real server: `python -m bench.load [--store PATH] [--seconds 3] [--concurrency 1,8,32,128,256]`.

Starts `python -m app` (real uvicorn) on a free port against a real Redis (`--redis-url`, default
$SGLORA_REDIS_URL or 127.0.0.1:6379; own key prefix, removed after from that same Redis), and drives it with
closed-loop clients (each client sends its next request when its last one is answered, a 503 included: they
ignore Retry-After, as most load balancers' retries and naive scripts do) for a fixed time per cell, for three
workloads:

  cached      POST /generate-lora, one description: every request after the first is a cache hit
  uncached    POST /generate-lora, a new description per request: every request generates
  retrieval   POST /retrieve, 4 images (64x64 PNG) x 4 captions, zero-shot

at each concurrency, once with micro-batching off and once on (SGLORA_BATCH_WINDOW_MS; `--batching off` for one).
Each row: goodput (answered 200s per second) and its share of the best goodput of that workload, latency
p50/p95/p99 of the answered requests, the share shed (503) and the 503s' median latency, other errors (timeouts
count here), the slowest /health/live answer meanwhile (event-loop stalls), the server's event-loop lag samples
over 100 ms and Redis errors (time-outs among them) from its /metrics, its peak resident memory, goodput as a
ratio to the unbatched run of the same cell (the baseline, measured in the same run), and the CPU time per answered
request (200 or 503) of the server and of this process's clients: the clients share the server's cores, so a cell
whose server CPU per request stays flat while goodput falls is limited by the machine, not by the server.

`--memory` instead measures one /retrieve of 64 solid-colour 4096x4096 PNGs (the issue's amplification case):
resident memory before, at its peak and 10 s after, threads, and the request's time and status. `--bodies 40`
instead sends 40 concurrent /retrieve uploads of `--body-mb` (30) MiB each the way curl sends a large body
(`Expect: 100-continue`): the server's peak RSS growth and how many were refused before any byte of their body
was sent. `--runner uvicorn` starts `uvicorn app.main:app` instead (for trees that predate `python -m app`),
`--tree` runs another checkout's code, and `--env K=V` passes settings (e.g. SGLORA_MAX_REQUEST_PIXELS for the
64 x 4096^2 request).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("cached", "uncached", "retrieval")
DEFAULT_REDIS = os.environ.get("SGLORA_REDIS_URL", "redis://127.0.0.1:6379/0")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, store: Path, tree: Path, runner: str, env: dict[str, str], redis_url: str = DEFAULT_REDIS,
                 log: Path | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"sglora-bench:{uuid.uuid4().hex[:8]}:"
        self.redis_url = env.get("SGLORA_REDIS_URL", redis_url)  # the server's, whichever way it was given
        base = {k: v for k, v in os.environ.items() if not k.startswith("SGLORA_")}
        self.env = base | {"PYTHONPATH": str(tree), "SGLORA_STORE_PATH": str(store), "SGLORA_DEVICE": "cpu",
                           "SGLORA_REDIS_URL": self.redis_url, "SGLORA_REDIS_PREFIX": self.prefix,
                           "SGLORA_LOG_LEVEL": "WARNING"} | env
        if runner == "uvicorn":
            self.cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(self.port), "--log-level",
                        "warning", "--no-access-log"]
        else:
            self.cmd = [sys.executable, "-m", "app", "--port", str(self.port)]
        self.tree = tree
        self.log = log  # where the server's output goes (appended); None: discarded

    def __enter__(self) -> ServerProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
        self.process = subprocess.Popen(self.cmd, cwd=self.tree, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if self.log:
            out.close()
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    self.peak = self.rss()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready within 180 s")

    def rss(self) -> int:
        return self.ps.memory_info().rss

    @contextlib.contextmanager
    def peak_rss(self, period_s: float = 0.02) -> Iterator[int]:
        """Sample the server's RSS every `period_s` while the block runs; yields the RSS before it, leaves the
        highest sample in `self.peak`."""
        before = self.peak = self.rss()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    self.peak = max(self.peak, self.rss())
                except psutil.Error:
                    return
                time.sleep(period_s)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield before
        finally:
            stop.set()
            watcher.join()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(match=self.prefix + "*", count=500))
            if keys:
                client.delete(*keys)
        except Exception as e:  # a bench must not fail on clean-up
            print(f"(could not remove {self.prefix}* from Redis: {e})", file=sys.stderr)


def _png_b64(size: int, colour: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _requests(workload: str):
    """An endless supply of (path, json body) for a workload."""
    if workload == "cached":
        return itertools.repeat(("/generate-lora", {"description": "a photo of a cached red circle"}))
    if workload == "uncached":
        run = uuid.uuid4().hex[:6]
        return (("/generate-lora", {"description": f"a photo of shape {run} number {i}"}) for i in itertools.count())
    images = [_png_b64(64, (40 * i, 200 - 40 * i, 90)) for i in range(4)]
    body = {"images": images, "texts": ["a red square", "a green square", "a blue square", "a grey square"]}
    return itertools.repeat(("/retrieve", body))


async def _drive(url: str, workload: str, concurrency: int, seconds: float, timeout_s: float,
                 server: psutil.Process) -> dict:
    supply = _requests(workload)
    latencies, statuses, refusals = [], [], []
    if workload == "cached":  # the one miss happens before the clock starts
        path, body = next(supply)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
            await client.post(path, json=body)

    async def one_client(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < end:
            path, body = next(supply)
            t0 = time.perf_counter()
            try:
                r = await client.post(path, json=body)  # a 503's Retry-After is ignored: at once again
                statuses.append(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                elif r.status_code == 503:
                    refusals.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                statuses.append(0)

    probes = []

    async def liveness_probe() -> None:
        # Event-loop health under load: /health/live does no work, so its latency is time spent waiting
        # for the loop (a separate connection, as a kubelet's probe would use).
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as probe:
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await probe.get("/health/live")
                    probes.append(time.perf_counter() - t)
                except httpx.HTTPError:
                    probes.append(timeout_s)
                await asyncio.sleep(0.1)

    async with contextlib.AsyncExitStack() as stack:
        # One connection per client, each in its own httpx client, made before the clock starts: a shared pool of
        # N connections costs client CPU that grows with N on every request (measured: 1.6 ms per request at 8
        # connections, 4-5 ms at 128-256), and the clients share the server's cores.
        clients = [await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1), timeout=timeout_s))
            for _ in range(concurrency)]
        end = time.perf_counter() + seconds
        t0, cpu0 = time.perf_counter(), (_cpu_seconds(server), _cpu_seconds(psutil.Process()))
        await asyncio.gather(liveness_probe(), *(one_client(c) for c in clients))
        wall, cpu1 = time.perf_counter() - t0, (_cpu_seconds(server), _cpu_seconds(psutil.Process()))
    ok = len(latencies)
    q = statistics.quantiles(latencies, n=100) if ok >= 2 else [latencies[0] if ok else float("nan")] * 99
    refused_p50 = statistics.median(refusals) if refusals else float("nan")
    return {"rps": ok / wall, "p50": q[49], "p95": q[94], "p99": q[98], "n": len(statuses), "p50_503": refused_p50,
            "shed": statuses.count(503) / max(1, len(statuses)),
            "errors": sum(1 for s in statuses if s not in (200, 503)), "live_max": max(probes, default=float("nan")),
            "server_cpu_ms": 1000 * (cpu1[0] - cpu0[0]) / max(1, len(statuses)),
            "client_cpu_ms": 1000 * (cpu1[1] - cpu0[1]) / max(1, len(statuses))}


def _server_counts(url: str) -> dict[str, float]:
    """Redis errors (time-outs among them) and event-loop lag so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"redis_errors": 0.0, "lag_over_100ms": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "sglora_cache_errors_total" and sample.labels.get("backend") == "redis":
                counts["redis_errors"] += sample.value
            elif sample.name == "sglora_event_loop_lag_seconds_count":
                counts["lag_over_100ms"] += sample.value
            elif sample.name == "sglora_event_loop_lag_seconds_bucket" and sample.labels.get("le") == "0.1":
                counts["lag_over_100ms"] -= sample.value
    return counts


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU time a process has used, all its threads, user + system."""
    times = process.cpu_times()
    return times.user + times.system


def run_table(store: Path, tree: Path, runner: str, env: dict[str, str], concurrency: list[int], seconds: float,
              window_ms: float, timeout_s: float, workloads: list[str] = WORKLOADS,
              batchings: tuple[bool, ...] = (False, True), log: Path | None = None) -> list[dict]:
    rows = []
    for batching in batchings:
        cell_env = env | {"SGLORA_BATCH_WINDOW_MS": str(window_ms if batching else 0)}
        with ServerProcess(store, tree, runner, cell_env, log=log) as server:
            for workload in workloads:
                for c in concurrency:
                    with server.peak_rss():
                        before = _server_counts(server.url)
                        result = asyncio.run(_drive(server.url, workload, c, seconds, timeout_s, server.ps))
                        after = _server_counts(server.url)
                    rows.append({"workload": workload, "concurrency": c, "batching": batching,
                                 "peak_rss_mb": server.peak / 2**20, **result,
                                 **{k: after[k] - before[k] for k in after}})
                    print(f"  {workload:9s} c={c:<4d} batching={batching!s:5s} {result['rps']:7.1f} req/s",
                          file=sys.stderr)
    base = {(r["workload"], r["concurrency"]): r["rps"] for r in rows if not r["batching"]}
    best = {}
    for r in rows:
        best[r["workload"], r["batching"]] = max(best.get((r["workload"], r["batching"]), 0.0), r["rps"])
    for r in rows:
        b = base.get((r["workload"], r["concurrency"]))
        r["ratio"] = r["rps"] / b if b else float("nan")
        top = best[r["workload"], r["batching"]]
        r["of_best"] = r["rps"] / top if top else float("nan")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | conc. | batching | goodput req/s | of best | ratio vs unbatched | p50 ms | p95 ms | p99 ms "
             "| shed 503 | 503 p50 ms | other errors | requests | /health/live max ms | loop lag > 100 ms "
             "| Redis errors | peak RSS MiB | server CPU ms/request | client CPU ms/request |", "|" + "---|" * 19]
    for r in sorted(rows, key=lambda r: (WORKLOADS.index(r["workload"]), r["concurrency"], r["batching"])):
        lines.append(f"| {r['workload']} | {r['concurrency']} | {'on' if r['batching'] else 'off'} "
                     f"| {r['rps']:.1f} | {r['of_best']:.2f} | {r['ratio']:.2f} | {1000 * r['p50']:.0f} "
                     f"| {1000 * r['p95']:.0f} | {1000 * r['p99']:.0f} | {100 * r['shed']:.1f}% "
                     f"| {1000 * r['p50_503']:.0f} | {r['errors']} | {r['n']} | {1000 * r['live_max']:.0f} "
                     f"| {r['lag_over_100ms']:.0f} | {r['redis_errors']:.0f} | {r['peak_rss_mb']:.0f} "
                     f"| {r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |")
    return "\n".join(lines)


def memory_probe(store: Path, tree: Path, runner: str, env: dict[str, str], images: int, side: int,
                 after_s: float) -> dict:
    body = {"images": [_png_b64(side, (200, 30, 30))] * images, "texts": ["a red square", "a blue circle"]}
    with ServerProcess(store, tree, runner, env) as server:
        time.sleep(1.0)
        with server.peak_rss() as before:
            cpu0 = sum(server.ps.cpu_times()[:2])
            t0 = time.perf_counter()
            r = httpx.post(server.url + "/retrieve", json=body, timeout=600)
            seconds = time.perf_counter() - t0
            cpu = sum(server.ps.cpu_times()[:2]) - cpu0
            time.sleep(after_s)
        return {"status": r.status_code, "body": r.text[:200] if r.status_code != 200 else "", "seconds": seconds,
                "cpu_s": cpu, "before_mb": before / 2**20, "peak_mb": server.peak / 2**20,
                "after_mb": server.rss() / 2**20, "threads": server.ps.num_threads(),
                "body_mb": len(httpx.Request("POST", "http://x", json=body).read()) / 2**20}


def _big_body(megabytes: float) -> bytes:
    """A /retrieve JSON body of about `megabytes` MiB: one PNG of noise (incompressible), base64."""
    import numpy as np
    from PIL import Image

    side = int((megabytes * 2**20 * 3 / 4 / 3) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=1)
    return ('{"images": ["' + base64.b64encode(buf.getvalue()).decode() + '"], "texts": ["noise"]}').encode()


def _upload(port: int, body: bytes, timeout_s: float) -> dict:
    """One client as curl sends a large body: headers with `Expect: 100-continue`, the body only after the
    server's 100. -> final status and the body bytes actually sent."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(f"POST /retrieve HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        sent = 0
        if status == 100:
            while reader.readline() not in (b"\r\n", b""):
                pass
            sock.sendall(body)
            sent = len(body)
            status = int(reader.readline().split()[1])
        return {"status": status, "sent": sent}


def bodies_probe(store: Path, tree: Path, runner: str, env: dict[str, str], clients: int, megabytes: float,
                 timeout_s: float) -> dict:
    """`clients` concurrent uploads of a `megabytes` body each: the server's RSS growth at its peak, and how
    many were refused before a byte of their body was sent."""
    from concurrent.futures import ThreadPoolExecutor

    body = _big_body(megabytes)
    with ServerProcess(store, tree, runner, env) as server:
        time.sleep(1.0)
        with server.peak_rss() as before:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda _: _upload(server.port, body, timeout_s), range(clients)))
            seconds = time.perf_counter() - t0
    statuses = sorted({r["status"] for r in results})
    return {"clients": clients, "body_mb": len(body) / 2**20, "seconds": seconds,
            "before_mb": before / 2**20, "growth_mb": (server.peak - before) / 2**20,
            "refused_unsent": sum(1 for r in results if r["sent"] == 0 and r["status"] == 503),
            "uploaded": sum(1 for r in results if r["sent"]),
            "statuses": {s: sum(1 for r in results if r["status"] == s) for s in statuses}}


def _machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("SGLORA_STORE_PATH", "model_store/tiny")))
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose code the server runs")
    parser.add_argument("--runner", choices=("app", "uvicorn"), default="app")
    parser.add_argument("--env", action="append", default=[], help="K=V passed to the server")
    parser.add_argument("--concurrency", default="1,8,32,128,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    parser.add_argument("--window-ms", type=float, default=5.0, help="micro-batching window of the 'on' runs")
    parser.add_argument("--memory", action="store_true", help="the 64 x 4096^2 /retrieve memory probe instead")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--after", type=float, default=10.0, help="seconds after the request to read RSS again")
    parser.add_argument("--bodies", type=int, default=0, help="instead: this many concurrent large uploads")
    parser.add_argument("--body-mb", type=float, default=30.0, help="size of each --bodies upload (MiB)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--batching", default="off,on", help="off, on, or off,on")
    parser.add_argument("--server-log", type=Path, default=None,
                        help="append the server's log (JSON lines, warnings and up) here instead of discarding it")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="the Redis the server uses (and the bench cleans)")
    args = parser.parse_args(argv)
    env = {"SGLORA_REDIS_URL": args.redis_url} | dict(kv.split("=", 1) for kv in args.env)
    print(f"machine at start: {_machine()}")
    if args.bodies:
        b = bodies_probe(args.store, args.tree.resolve(), args.runner, env, args.bodies, args.body_mb, args.timeout)
        print(f"| uploads | body MiB | RSS before MiB | peak growth MiB | refused before upload | uploaded "
              f"| statuses | seconds |\n|---|---|---|---|---|---|---|---|\n| {b['clients']} | {b['body_mb']:.1f} "
              f"| {b['before_mb']:.0f} | {b['growth_mb']:.0f} | {b['refused_unsent']} | {b['uploaded']} "
              f"| {b['statuses']} | {b['seconds']:.1f} |")
        print(f"machine at end: {_machine()}")
        return 0
    if args.memory:
        m = memory_probe(args.store, args.tree.resolve(), args.runner, env, args.images, args.side, args.after)
        print(f"| request | status | time s | server CPU s | RSS before MiB | peak MiB | after {args.after:g} s MiB "
              f"| threads |\n|---|---|---|---|---|---|---|---|\n| {args.images} x {args.side}^2 PNG "
              f"({m['body_mb']:.1f} MiB body) | {m['status']} | {m['seconds']:.1f} | {m['cpu_s']:.1f} "
              f"| {m['before_mb']:.0f} | {m['peak_mb']:.0f} (+{m['peak_mb'] - m['before_mb']:.0f}) "
              f"| {m['after_mb']:.0f} (+{m['after_mb'] - m['before_mb']:.0f}) | {m['threads']} |")
        if m["body"]:
            print(f"body: {m['body']}")
        return 0
    concurrency = [int(c) for c in args.concurrency.split(",")]
    batchings = tuple(b == "on" for b in args.batching.split(","))
    rows = run_table(args.store, args.tree.resolve(), args.runner, env, concurrency, args.seconds, args.window_ms,
                     args.timeout, args.workloads.split(","), batchings, args.server_log)
    print(table(rows))
    print(f"machine at end: {_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
