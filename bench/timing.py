"""Careful timing and peak-memory measurement shared by the benchmarks.

Timing: every candidate is warmed up, then the candidates are run in interleaved rounds (round r runs each of them
once, in a rotated order) and each one's median over the rounds is reported. Interleaving matters on a shared,
busy machine: a burst of load from elsewhere hits every candidate of a round rather than all repeats of one, so
the ratios between candidates stay meaningful even when the absolute times drift.

Peak memory, by device:
  cuda  torch.cuda.max_memory_allocated() during one call, minus what was allocated before it (bytes the call
        added at its peak: activations, gathered adapters, temporaries);
  cpu   peak resident-set growth during one call: the kernel's high-water mark (VmHWM) is reset through
        /proc/self/clear_refs and the result is VmHWM - VmRSS before the call. tracemalloc is no use here: it
        sees Python's allocator, not torch's. For the number to mean "bytes the call needed", glibc must not
        serve the call from memory it cached earlier: free heap pages are handed back first (malloc_trim), and
        while measuring, blocks of 64 KiB and up are mmap'ed (mallopt M_MMAP_THRESHOLD), so they are returned
        on free and each call faults in what it touches. Afterwards the threshold is left at 32 MiB (where
        glibc's own adaptive threshold tops out), not at its adaptive default, which mallopt cannot restore.
        Linux/glibc only; elsewhere the column is empty. Page-granular and noisier than the CUDA number:
        compare the modes of one table, not runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 7,
    warmup: int = 2,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in `repeats` interleaved rounds.

    A round times `number` back-to-back calls of each candidate (number chosen once, so that the slowest
    candidate's block takes about `min_time_s`; 1 when min_time_s is 0) and records the mean.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    slowest = 0.0  # the slowest candidate's best warm-up call: first calls pay one-off costs
    for name in names:
        best = float("inf")
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            candidates[name]()
            _sync(device)
            best = min(best, time.perf_counter() - start)
        slowest = max(slowest, best)
    number = max(1, int(min_time_s / slowest)) if min_time_s > 0 and slowest > 0 else 1
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = candidates[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / number)
    return {n: statistics.median(s) for n, s in samples.items()}


# ------------------------------------------------------------------------------------------------ memory

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@contextlib.contextmanager
def _measuring_malloc():
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def _vm(field: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024  # kB
    raise KeyError(field)


def cpu_peak_supported() -> bool:
    if not (_PROC_STATUS.is_file() and _CLEAR_REFS.exists()):
        return False
    try:
        _CLEAR_REFS.write_text("5")
        _vm("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated delta"
    return "peak RSS delta (VmHWM reset via clear_refs)" if cpu_peak_supported() else "unavailable"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> int | None:
    """Bytes one call of `fn` adds at its peak: the median over `repeats` calls, after one unmeasured call."""
    if device.type != "cuda" and not cpu_peak_supported():
        return None
    fn()  # first-call allocations (caches, lazily built state) are not the call's working memory
    results = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            results.append(torch.cuda.max_memory_allocated(device) - before)
        else:
            with _measuring_malloc():
                if hasattr(_LIBC, "malloc_trim"):
                    _LIBC.malloc_trim(0)
                _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
                before = _vm("VmRSS")
                fn()
                results.append(max(0, _vm("VmHWM") - before))
    return int(statistics.median(results))


@contextlib.contextmanager
def threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ output


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], title: str = "") -> str:
    """A plain-text table; `columns` are (key, header). Floats are printed with a sensible number of digits."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [title] if title else []
    out += [line(heads), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20
