"""One thread that runs blocking calls, one after the other, for an event loop.

The local storages hand every batch to a thread of their own (a commit, an append and its
flush). ``loop.run_in_executor`` with a one-thread ``ThreadPoolExecutor`` does the same for
twice the cost: a concurrent future with its condition, a work item, the executor's thread
accounting, then an asyncio future chained to the concurrent one. Measured on the benchmark
machine (uvloop, a call that does nothing): 67 to 98 µs of CPU and 59 to 89 µs of wall time
per call, against 31 to 32 µs here, where a call is a tuple on a :class:`queue.SimpleQueue`
and its result one ``call_soon_threadsafe``. At one session a message costs one such
hand-off, and its wall time is part of the time before ``250``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CallThread"]

T = TypeVar("T")

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class CallThread:
    """A thread named ``name``, started at the first call, that runs the calls given to
    :meth:`run` in order. A call whose caller was cancelled before it began is skipped, as an
    executor skips it; one under way runs to its end.

    The thread is a daemon thread: a storage never closed does not keep the interpreter from
    exiting. A storage's ``close()`` calls :meth:`shutdown`, which runs what was given first;
    a process that ends without it ends as a crash would, which the storages survive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._shut = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread; its result, or its exception raised here.

        :raises RuntimeError: after :meth:`shutdown`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._shut:
                raise RuntimeError(f"{self.name}: cannot run a call after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._calls.put((loop, future, fn, args))
        return await future

    def shutdown(self, wait: bool = True) -> None:
        """Run the calls already given, then end the thread (``wait``: until it has ended)."""
        with self._lock:
            self._shut = True
            thread = self._thread
            if thread is not None:
                self._calls.put(None)
        if wait and thread is not None:
            thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            _carry_out(*call)
            del call  # nothing of a call outlives it here


def _carry_out(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    if future.cancelled():
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # as an executor does: the caller gets it
        _hand_over(loop, _fail, future, exc)
    else:
        _hand_over(loop, _succeed, future, result)


def _hand_over(loop: asyncio.AbstractEventLoop, settle: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle, *args)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        if isinstance(exc, StopIteration):  # a future cannot hold one
            exc = RuntimeError(f"StopIteration from a call: {exc!r}")
        future.set_exception(exc)
