"""The garbage collector and a loaded model: keep full collections off what was loaded once.

CPython's oldest-generation collection walks every container object the process tracks. A process with a loaded
engine (the backbone's modules and parameters, the store's manifest, open_clip and torch internals) tracks over
400,000 of them even with the tiny model, so once serving, every full collection stopped the event loop, and
every other thread, for ~170 ms (2-core machine; bench.load, cached /generate-lora at 256 connections: 12 loop
stalls over 100 ms in 8 s, each a full collection that freed nothing). Requests allocate enough that full
collections keep coming however long the process runs.

`gc.freeze()` (CPython's answer for exactly this, since 3.7) moves every object alive now into a permanent
generation that collections skip; reference counting still frees them. Called after each load and reload, with
the previous freeze undone and a full collection first, so garbage from before (a replaced store) is collected
once rather than frozen for good.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_loaded_objects() -> int:
    """Collect what is garbage now, then freeze everything still alive; returns how many objects were frozen."""
    t0 = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%d objects moved out of the collector's reach in %.2fs", frozen, time.perf_counter() - t0)
    return frozen
