"""Admission control: a bounded amount of model work at once, a bounded wait for the rest, fast 503s beyond.

A request that needs the model (an uncached generation, a retrieval) takes a *slot* first:

  * at most `limit` slots are held at once; blocking work runs in a pool of that many threads, so the CPU/GPU
    never has more than `limit` requests' forwards competing for it;
  * at most `queue` requests wait for a slot, each for at most `wait_s`. The wait is deadline-aware: from the
    measured time a slot is held (a moving average), a request whose expected wait exceeds `wait_s` is refused
    at once (503 with Retry-After) instead of queueing for a wait it would not survive. Waiting costs nothing;
    a refusal a client ignores comes straight back, so what the queue can serve in time it keeps;
  * `refusal()` says, without queueing, whether a request arriving now would be refused: the gate in front of
    the body (`app.api.gate`) asks it before a body is read;
  * a request whose client has gone is dropped before its work starts, and every `Slot.run` is a safe point:
    between images, before the generation step, the client is checked again and the rest of the work is
    skipped (`sglora_work_cancelled_total{step}` counts the steps saved; the request is logged 499).

Image decoding runs in its own small pool (`decode_workers` threads): it bounds how many decoded images exist
at once across all requests (each request decodes one image at a time), whatever the slot limit.

A slot is given back when the work it started has really finished, not when its request stops waiting: a
request cut by its deadline cannot free a slot its thread still uses. The standard library has no bounded-wait
semaphore with a queue limit, hence this small class.

`BodyBudget` bounds the bytes of request bodies held across all requests (the per-request limit alone lets
N concurrent uploads hold N times that).

Accelerator out-of-memory in a worker frees the allocator's cache and becomes a 503 (`OutOfMemory`): the
request is shed, the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

import torch

from app.core.errors import ClientGone, OutOfMemory, Overloaded
from app.core.memory import free_accelerator_memory
from app.core.metrics import Metrics

logger = logging.getLogger(__name__)
R = TypeVar("R")
SERVICE_TIME_WEIGHT = 0.2  # weight of the newest slot's hold time in the moving average


def _guarded(fn: Callable[..., R], *args) -> R:
    """fn(*args) in a worker thread; an accelerator out-of-memory frees the allocator's cache and is a 503."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as e:
        free_accelerator_memory()
        raise OutOfMemory("the accelerator ran out of memory for this request; retry shortly, or send fewer or "
                          "smaller inputs") from e


class Slot:
    """One request's permission to do model work; runs its blocking calls in the admission's pools."""

    def __init__(self, admission: Admission, disconnected: Callable[[], Awaitable[bool]] | None = None):
        self._admission, self._disconnected = admission, disconnected
        self._started: list[Future] = []  # appended on the loop only; read once the block ends
        self._since = time.monotonic()

    async def run(self, fn: Callable[..., R], *args, decode: bool = False) -> R:
        """fn(*args) in the model pool (or the decode pool), with this task's context (request id for logs).
        A safe point: when the client has gone, the step is not started (ClientGone, logged 499)."""
        metrics = self._admission.metrics
        if self._disconnected is not None and await self._disconnected():
            metrics.work_cancelled.labels(getattr(fn, "__name__", "work")).inc()
            raise ClientGone()
        pool = self._admission.decode_pool if decode else self._admission.model_pool
        future = pool.submit(contextvars.copy_context().run, _guarded, fn, *args)
        self._started.append(future)
        try:
            return await asyncio.wrap_future(future)
        except OutOfMemory:
            metrics.shed.labels("out_of_memory").inc()
            raise

    def _release_when_idle(self) -> None:
        pending = [f for f in self._started if not f.done()]
        if not pending:
            self._admission._release(time.monotonic() - self._since)
            return
        loop = asyncio.get_running_loop()
        remaining = len(pending)

        def done(_: Future) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                loop.call_soon_threadsafe(self._admission._release, time.monotonic() - self._since)

        for f in pending:
            f.add_done_callback(done)


class BodyBudget:
    """Bytes of request bodies admitted at once, across all requests: reserved from the headers (Content-Length)
    or as a body streams, given back when its request ends. Loop-only, so no lock."""

    def __init__(self, limit_bytes: int, metrics: Metrics):
        self.limit, self.metrics, self.used = limit_bytes, metrics, 0

    def reserve(self, n: int) -> bool:
        if n > 0 and self.used + n > self.limit:
            self.metrics.shed.labels("body_budget").inc()
            return False
        self.used += n
        self.metrics.body_bytes.set(self.used)
        return True

    def release(self, n: int) -> None:
        self.used -= n
        self.metrics.body_bytes.set(self.used)


class Admission:
    def __init__(self, limit: int, queue: int, wait_s: float, decode_workers: int, metrics: Metrics,
                 model_thread_init: Callable[[], None] | None = None):
        self.limit, self.queue, self.wait_s, self.metrics = limit, queue, wait_s, metrics
        # model_thread_init: run on each model thread as it starts (its CPU thread count: app/ml/threads.py)
        self.model_pool = ThreadPoolExecutor(limit, thread_name_prefix="sglora-model", initializer=model_thread_init)
        self.decode_pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="sglora-decode")
        self._held = 0
        self._waiters: list[asyncio.Future] = []  # FIFO of requests waiting for a slot
        self.service_s: float | None = None  # moving average of how long a request holds its slot

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def expected_wait(self, position: int) -> float:
        """Seconds until the waiter at `position` (1 = next) gets a slot, at the measured service time."""
        return 0.0 if self.service_s is None else position * self.service_s / self.limit

    def refusal(self) -> tuple[str, str] | None:
        """(reason, message) when a request arriving now would be refused at once; None when it would get a
        slot or a place in the queue it can expect to leave within `wait_s`."""
        if self._held < self.limit and not self._waiters:
            return None
        if len(self._waiters) >= self.queue:
            return "queue_full", (f"the server is at its limit of {self.limit} concurrent requests with "
                                  f"{self.queue} waiting; retry shortly")
        expected = self.expected_wait(len(self._waiters) + 1)
        if expected > self.wait_s:
            return "expected_wait", (f"the expected wait for capacity is {expected:.1f}s, longer than the "
                                     f"{self.wait_s:g}s a request may wait; retry shortly")
        return None

    def check(self) -> None:
        """Overloaded now if a request arriving now would be refused: lets a caller refuse before the work that
        precedes admission (a cache miss's shared lock and second read) instead of after it."""
        refused = self.refusal()
        if refused is not None:
            reason, message = refused
            self.metrics.shed.labels(reason).inc()
            raise Overloaded(message)

    def _publish(self) -> None:
        self.metrics.work_running.set(self._held)
        self.metrics.work_waiting.set(len(self._waiters))

    async def _acquire(self, bounded: bool = True) -> None:
        """A slot, at once or after a wait in FIFO order. `bounded`: refused (Overloaded) when the queue is full,
        the expected wait too long or the wait runs out; unbounded waits its turn whatever the queue."""
        if self._held < self.limit and not self._waiters:
            self._held += 1
            self._publish()
            return
        if bounded:
            self.check()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_s if bounded else None)
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

    def _release(self, held_s: float | None = None) -> None:
        if held_s is not None:
            self.service_s = held_s if self.service_s is None else (
                (1 - SERVICE_TIME_WEIGHT) * self.service_s + SERVICE_TIME_WEIGHT * held_s)
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
        """Hold a slot for the block; Overloaded when none comes in time, ClientGone when nobody waits (now,
        or at any later `Slot.run`)."""
        await self._acquire()
        slot = Slot(self, disconnected)
        try:
            if disconnected is not None and await disconnected():
                self.metrics.shed.labels("client_gone").inc()
                raise ClientGone()
            yield slot
        finally:
            slot._release_when_idle()

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[Slot]:
        """One slot for work shared by many requests (a micro-batch's forward): counted as one unit of model
        work, it waits its turn in the queue and is never refused (its requests were admitted already)."""
        await self._acquire(bounded=False)
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot._release_when_idle()

    def close(self) -> None:
        self.model_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
