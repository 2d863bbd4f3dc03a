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


async def until(condition, timeout_s: float = 30.0) -> None:
    """Yield to the loop until `condition()` holds; a deadline only against a hang, far above any scheduling delay."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_beyond_the_limit_and_the_queue_is_an_immediate_overload():
    async def scenario():
        # "Immediate" is shown by the path taken, not by a stopwatch: with a 60 s wait allowed, a request that
        # waited would end as wait_timeout ("no capacity within 60s") after a minute, not as queue_full.
        a = admission(limit=1, queue=0, wait_s=60.0)
        async with a.slot():
            with pytest.raises(Overloaded, match="at its limit") as e:
                async with a.slot():
                    pass
            assert e.value.retry_after_s == 1 and a.waiting == 0
        async with a.slot():  # free again
            pass
        assert a.metrics.shed.labels("queue_full")._value.get() == 1

    asyncio.run(scenario())


def test_waiters_are_served_in_order_and_a_wait_is_bounded():
    async def scenario():
        # The first user holds its slot until the test lets go, not for a guessed time: on a loaded machine a
        # 0.1 s hold against a 0.3 s wait could let a waiter time out first.
        a = admission(limit=1, queue=2, wait_s=60.0)
        order, release = [], asyncio.Event()

        async def user(name):
            async with a.slot():
                order.append(name)
                if name == "a":
                    await release.wait()

        first = asyncio.create_task(user("a"))
        await until(lambda: order == ["a"])
        waiters = [asyncio.create_task(user("b"))]
        await until(lambda: a.waiting == 1)
        waiters.append(asyncio.create_task(user("c")))
        await until(lambda: a.waiting == 2)
        release.set()
        await asyncio.gather(first, *waiters)
        assert order == ["a", "b", "c"] and a.waiting == 0

        a = admission(limit=1, queue=2, wait_s=0.3)
        async with a.slot():  # held until the waiter's 0.3 s are over, however long that takes here
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
        # Free once the thread has finished: wait for that, not for a guessed 0.1 s (the thread and the loop's
        # callback may both be descheduled on a busy machine).
        await until(lambda: a.metrics.work_running._value.get() == 0)
        async with a.slot():
            pass

    asyncio.run(scenario())
