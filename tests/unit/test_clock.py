"""first_of: the first wake-up ends the wait, the others are cancelled and collected."""

from __future__ import annotations

import asyncio

from smtpq.clock import ManualClock, first_of


async def test_the_first_to_end_ends_the_wait_and_the_others_are_cancelled() -> None:
    clock = ManualClock()
    event = asyncio.Event()
    cancelled: list[str] = []

    async def sleeper() -> None:
        try:
            await clock.sleep(60)
        except asyncio.CancelledError:
            cancelled.append("sleep")
            raise

    waiting = asyncio.ensure_future(first_of(event.wait(), sleeper()))
    await asyncio.sleep(0)
    assert not waiting.done()
    event.set()
    await asyncio.wait_for(waiting, 1)
    assert cancelled == ["sleep"]


async def test_a_clock_that_moves_ends_the_wait_too() -> None:
    clock = ManualClock()
    event = asyncio.Event()
    waiting = asyncio.ensure_future(first_of(event.wait(), clock.sleep(10)))
    for _ in range(3):  # first_of starts, then the sleep it wraps
        await asyncio.sleep(0)
    await clock.advance(10)
    await asyncio.wait_for(waiting, 1)
    assert not event.is_set()
