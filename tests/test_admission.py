"""Admission control at unit level (no model): the slot limit, the bounded queue, the bounded wait, FIFO hand-over,
dropping work for a client that left, and a slot held until its thread really finishes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.core.errors import ClientGone, Overloaded
from app.core.metrics import Metrics
from app.services.admission import Admission


def admission(limit=1, queue=0, wait_s=1.0) -> Admission:
    return Admission(limit, queue, wait_s, decode_workers=1, metrics=Metrics())


def test_beyond_the_limit_and_the_queue_is_an_immediate_overload():
    async def scenario():
        a = admission(limit=1, queue=0)
        async with a.slot():
            t0 = time.perf_counter()
            with pytest.raises(Overloaded) as e:
                async with a.slot():
                    pass
            assert time.perf_counter() - t0 < 0.1 and e.value.retry_after_s == 1
        async with a.slot():  # free again
            pass
        assert a.metrics.shed.labels("queue_full")._value.get() == 1

    asyncio.run(scenario())


def test_waiters_are_served_in_order_and_a_wait_is_bounded():
    async def scenario():
        a = admission(limit=1, queue=2, wait_s=0.3)
        order = []

        async def user(name, hold_s):
            async with a.slot():
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(user("a", 0.1))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(user(n, 0.0)) for n in ("b", "c")]
        await asyncio.sleep(0.01)
        assert a.waiting == 2
        await asyncio.gather(first, *waiters)
        assert order == ["a", "b", "c"] and a.waiting == 0

        async with a.slot():  # held past the waiter's 0.3 s
            with pytest.raises(Overloaded, match="no capacity within 0.3s"):
                async with a.slot():
                    pass
        assert a.waiting == 0

    asyncio.run(scenario())


def test_work_for_a_client_that_left_is_dropped_before_it_starts():
    async def scenario():
        a = admission(limit=1, queue=1)
        ran = []

        async def gone() -> bool:
            return True

        with pytest.raises(ClientGone):
            async with a.slot(gone) as slot:
                await slot.run(ran.append, 1)
        assert ran == [] and a.metrics.shed.labels("client_gone")._value.get() == 1
        async with a.slot():  # the slot was given back
            pass

    asyncio.run(scenario())


def test_a_slot_is_held_until_its_thread_finishes_even_when_the_request_is_cut():
    async def scenario():
        a = admission(limit=1, queue=0)
        release = threading.Event()

        async def cut_short():
            async with a.slot() as slot:
                await slot.run(release.wait, 5)

        task = asyncio.create_task(cut_short())
        await asyncio.sleep(0.05)
        task.cancel()  # e.g. the request deadline
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(Overloaded):  # the thread still runs: its slot is not free
            async with a.slot():
                pass
        release.set()
        await asyncio.sleep(0.1)
        async with a.slot():
            pass

    asyncio.run(scenario())
