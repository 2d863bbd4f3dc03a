"""Work-item functions for the engine tests. Ray workers import them by name, and a worker that replaces a killed
one has to import this module again: so it imports nothing heavy (no torch), keeping a restart quick."""

from __future__ import annotations

import os
from pathlib import Path


def die_once(shared: dict, item: str) -> dict:
    """Kill this worker process the first time a listed item is seen (a marker file remembers), succeed after."""
    marker = Path(shared["markers"]) / item
    if item in shared["kill"] and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # no exception, no cleanup: what an OOM kill or a lost node looks like to Ray
    first = int(marker.read_text()) if marker.exists() else None
    return {"item": item, "pid": os.getpid(), "killed_pid": first}


def fail_on(shared: dict, item: str) -> str:
    if item == shared["bad"]:
        raise ValueError(f"cannot process {item}")
    return item


def thread_counts(shared, item) -> dict:
    import torch  # here, not at the top: see the module's docstring

    return {"torch": torch.get_num_threads()}
