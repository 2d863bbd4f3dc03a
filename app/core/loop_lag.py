"""Event-loop lag: how late the loop runs a timer. Every request, every Redis reply and every probe waits for
the loop, so a stall shows here first: CPU work on the loop that scales with input (it should be none), or a
machine too busy to schedule the process. Exported as `sglora_event_loop_lag_seconds`."""

from __future__ import annotations

import asyncio

from app.core.metrics import Metrics

INTERVAL_S = 0.1


async def watch_loop_lag(metrics: Metrics, interval_s: float = INTERVAL_S) -> None:
    """Run for the life of the app (a lifespan task): sleep `interval_s`, record how much longer it took."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval_s)
        metrics.loop_lag.observe(max(0.0, loop.time() - t0 - interval_s))
