"""Admission control: a bounded amount of model work at once, a bounded wait for the rest, fast 503s beyond.

A request that needs the model (an uncached generation, a retrieval) takes a *slot* first:

  * at most `limit` slots are held at once; blocking work runs in a pool of that many threads, so the CPU/GPU
    never has more than `limit` requests' forwards competing for it;
  * at most `queue` requests wait for a slot, each for at most `wait_s`; a request beyond that, or whose wait
    ran out, gets `Overloaded` (503 with Retry-After) at once, before any of its work is done;
  * a request whose client has gone by the time it gets its slot is dropped before its work starts.

Image decoding runs in its own small pool (`decode_workers` threads): it bounds how many decoded images exist
at once across all requests (each request decodes one image at a time), whatever the slot limit.

A slot is given back when the work it started has really finished, not when its request stops waiting: a
request cut by its deadline cannot free a slot its thread still uses. The standard library has no bounded-wait
semaphore with a queue limit, hence this small class.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from app.core.errors import ClientGone, Overloaded
from app.core.metrics import Metrics

logger = logging.getLogger(__name__)
R = TypeVar("R")


class Slot:
    """One request's permission to do model work; runs its blocking calls in the admission's pools."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._started: list[Future] = []  # appended on the loop only; read once the block ends

    async def run(self, fn: Callable[..., R], *args, decode: bool = False) -> R:
        """fn(*args) in the model pool (or the decode pool), with this task's context (request id for logs)."""
        pool = self._admission.decode_pool if decode else self._admission.model_pool
        future = pool.submit(contextvars.copy_context().run, fn, *args)
        self._started.append(future)
        return await asyncio.wrap_future(future)

    def _release_when_idle(self) -> None:
        pending = [f for f in self._started if not f.done()]
        if not pending:
            self._admission._release()
            return
        loop = asyncio.get_running_loop()
        remaining = len(pending)

        def done(_: Future) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                loop.call_soon_threadsafe(self._admission._release)

        for f in pending:
            f.add_done_callback(done)


class Admission:
    def __init__(self, limit: int, queue: int, wait_s: float, decode_workers: int, metrics: Metrics):
        self.limit, self.queue, self.wait_s, self.metrics = limit, queue, wait_s, metrics
        self.model_pool = ThreadPoolExecutor(limit, thread_name_prefix="sglora-model")
        self.decode_pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="sglora-decode")
        self._held = 0
        self._waiters: list[asyncio.Future] = []  # FIFO of requests waiting for a slot

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _publish(self) -> None:
        self.metrics.work_running.set(self._held)
        self.metrics.work_waiting.set(len(self._waiters))

    async def _acquire(self) -> None:
        if self._held < self.limit and not self._waiters:
            self._held += 1
            self._publish()
            return
        if len(self._waiters) >= self.queue:
            self.metrics.shed.labels("queue_full").inc()
            raise Overloaded(f"the server is at its limit of {self.limit} concurrent requests with "
                             f"{self.queue} waiting; retry shortly")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.done() and not waiter.cancelled():  # granted just as we gave up: pass the slot on
                self._release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            self._publish()
            if isinstance(e, TimeoutError):
                self.metrics.shed.labels("wait_timeout").inc()
                raise Overloaded(f"no capacity within {self.wait_s:g}s; retry shortly") from None
            raise

    def _release(self) -> None:
        while self._waiters:  # hand the slot straight to the longest waiter
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                self._publish()
                return
        self._held -= 1
        self._publish()

    @asynccontextmanager
    async def slot(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Slot]:
        """Hold a slot for the block; Overloaded when none comes in time, ClientGone when nobody waits."""
        await self._acquire()
        slot = Slot(self)
        try:
            if disconnected is not None and await disconnected():
                self.metrics.shed.labels("client_gone").inc()
                raise ClientGone()
            yield slot
        finally:
            slot._release_when_idle()

    def close(self) -> None:
        self.model_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
