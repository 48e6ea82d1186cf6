"""CallThread: blocking calls run in order in one thread, their results and errors handed back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from smtpq.storage.thread import CallThread


async def test_calls_run_in_order_in_one_named_thread() -> None:
    worker = CallThread("smtpq-test-calls")
    seen: list[tuple[int, str]] = []

    def record(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 2

    try:
        results = await asyncio.gather(*(worker.run(record, n) for n in range(50)))
    finally:
        worker.shutdown()
    assert results == [n * 2 for n in range(50)]
    assert seen == [(n, "smtpq-test-calls") for n in range(50)]


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = CallThread("smtpq-test-errors")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    def stop() -> None:
        raise StopIteration  # a future cannot carry this one as it is

    try:
        with pytest.raises(OSError, match="No space left"):
            await worker.run(fail)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await worker.run(stop)
        assert await worker.run(sum, (1, 2, 3)) == 6
    finally:
        worker.shutdown()


async def test_a_call_cancelled_before_it_began_is_skipped() -> None:
    worker = CallThread("smtpq-test-cancel")
    gate = threading.Event()
    ran: list[str] = []

    def blocked() -> None:
        gate.wait(5)
        ran.append("first")

    first = asyncio.ensure_future(worker.run(blocked))
    second = asyncio.ensure_future(worker.run(ran.append, "second"))
    await asyncio.sleep(0.01)
    second.cancel()
    gate.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    await worker.run(ran.append, "third")
    worker.shutdown()
    assert ran == ["first", "third"]


async def test_shutdown_runs_what_was_given_then_refuses_more() -> None:
    worker = CallThread("smtpq-test-shutdown")
    done: list[int] = []
    pending = [asyncio.ensure_future(worker.run(done.append, n)) for n in range(5)]
    await asyncio.sleep(0)  # each call is handed over
    await asyncio.to_thread(worker.shutdown)
    await asyncio.gather(*pending)
    assert done == list(range(5))
    with pytest.raises(RuntimeError, match="after shutdown"):
        await worker.run(done.append, 5)


async def test_no_thread_before_the_first_call() -> None:
    worker = CallThread("smtpq-test-idle")
    assert "smtpq-test-idle" not in {t.name for t in threading.enumerate()}
    worker.shutdown()  # nothing to join
    with pytest.raises(RuntimeError, match="after shutdown"):
        await worker.run(sum, (1,))
    assert "smtpq-test-idle" not in {t.name for t in threading.enumerate()}
