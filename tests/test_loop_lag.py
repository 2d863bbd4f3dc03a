"""The event-loop lag metric sees a stall: a callback that holds the loop shows up as a late timer."""

from __future__ import annotations

import asyncio
import time

from app.core.loop_lag import watch_loop_lag
from app.core.metrics import Metrics


def lag_samples(metrics: Metrics, above_s: float = -1.0) -> float:
    """Samples of sglora_event_loop_lag_seconds above `above_s` (all of them by default)."""
    buckets = {s.labels["le"]: s.value for m in metrics.loop_lag.collect() for s in m.samples
               if s.name.endswith("_bucket")}
    return buckets["+Inf"] - (buckets[repr(above_s)] if above_s >= 0 else 0)


def test_a_stalled_loop_is_measured_as_lag():
    async def scenario():
        metrics = Metrics()
        watcher = asyncio.create_task(watch_loop_lag(metrics, interval_s=0.01))
        while lag_samples(metrics) == 0:  # the watcher is running
            await asyncio.sleep(0.01)
        time.sleep(0.6)  # the stall under test: CPU work on the loop, nothing else can run meanwhile
        while lag_samples(metrics, 0.25) == 0:  # its timer was due during the stall: it fires >= 0.59 s late
            await asyncio.sleep(0.01)
        watcher.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 30))
