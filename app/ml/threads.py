"""CPU threads of the model work.

Each admission slot runs its model calls on a thread of its own; left at torch's default, every one of them would
use as many intra-op threads as the machine has cores, so `max_concurrent_work` slots oversubscribe the cores and
spin against each other (and against the event loop). bench.load on 2 cores, 2 slots: uncached /generate-lora at
32 connections 90.6 req/s with the default, 105.5 with one thread per slot. The serving default divides the cores
among the slots (`Settings.work_threads`); the offline build pins its own (`offline/threads.py`).
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_slot(configured: int | None, slots: int) -> int:
    """The configured count, or the cores divided among the slots (at least one)."""
    return configured if configured is not None else max(1, available_cores() // slots)


def use_threads(n: int) -> None:
    """Run on each model thread as it starts: its torch calls use `n` intra-op threads."""
    import torch

    torch.set_num_threads(n)
