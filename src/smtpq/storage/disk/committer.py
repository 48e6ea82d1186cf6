"""Group commit: the operations of a disk queue gathered into batches (event loop side).

While one batch is being committed the next one gathers; there is no timer, so a lone write
is committed at once. Removals alone — submitted when no batch runs, or left pending when one
ends — wait up to :data:`REMOVE_LINGER` for company: only the attempt that delivered the
message awaits a removal, and at low load the next message's write then carries it in the same
commit (one hand-off to the commit thread and no flush of its own, where it would cost one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from smtpq.errors import QueueError
from smtpq.storage.disk.batch import BatchWriter, Op, OpKind
from smtpq.storage.thread import CallThread

__all__ = ["REMOVE_LINGER", "GroupCommitter"]

log = logging.getLogger(__name__)

#: Seconds removals alone wait for other operations to share their commit with: longer than
#: the time between two messages of one SMTP session, also on a busy machine. The price is
#: that a crash meanwhile delivers the removed messages again.
REMOVE_LINGER = 0.02


class GroupCommitter:
    """Gathers operations into batches and has a :class:`BatchWriter` carry out each one in
    the commit thread, one batch at a time.

    :param on_committed: called on the event loop with each batch, once it is carried out and
        before its callers learn the outcome (each op's result or error).
    """

    def __init__(self, writer: BatchWriter, on_committed: Callable[[list[Op]], None]) -> None:
        self._writer = writer
        self._on_committed = on_committed
        self._pending: list[Op] = []
        self._task: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None  # removals waiting for company
        self._draining = False  # nothing waits for company any more
        self._thread = CallThread("smtpq-disk-commit")
        #: Ids with a write or a removal submitted and not yet committed, and how many; read
        #: by the load's scan thread (a dict's reads are atomic). A plain dict: Counter's
        #: ``+=`` and ``del`` run in Python.
        self.inflight: dict[str, int] = {}
        #: Batches committed, and the operations they carried (their ratio is the group-commit
        #: factor).
        self.batches = 0
        self.batched_ops = 0

    async def submit(self, op: Op) -> Any:
        """Commit ``op`` with the next batch; its result, or raise its error."""
        loop = asyncio.get_running_loop()
        op.future = future = loop.create_future()
        if op.kind in (OpKind.WRITE, OpKind.REMOVE):
            self.inflight[op.id] = self.inflight.get(op.id, 0) + 1
        self._pending.append(op)
        if self._task is None:
            if op.kind != OpKind.REMOVE:
                self._start()
            else:
                self._wait_for_company()
        # A cancelled caller cancels only its future: the op stays in its batch all the same,
        # and _finish leaves a done future alone (no shield needed, nor its extra future).
        return await future

    def _wait_for_company(self) -> None:
        """Nobody but the finished attempts waits for the pending removals: they wait a little
        for company, so that at low load the next message's write carries them."""
        if self._linger is None and not self._draining:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(REMOVE_LINGER, self._start)

    def _start(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._task is None and self._pending:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        size = self._writer.max_batch
        try:
            while self._pending:
                batch = self._pending[:size]
                del self._pending[:size]
                try:
                    await self._thread.run(self._writer.commit, batch)
                except Exception as exc:  # the batch is lost, the committer goes on
                    log.exception("queue commit failed")
                    for op in batch:
                        op.error = op.error or QueueError(f"queue storage failure: {exc!r}")
                except BaseException:
                    error = QueueError("queue storage stopped")
                    for op in batch + self._pending:
                        op.error = op.error or error
                    batch += self._pending
                    self._pending.clear()
                    self._finish(batch)
                    raise
                self._finish(batch)
                if self._pending and self._lonely():  # submitted while this batch ran
                    self._wait_for_company()
                    if self._linger is not None:
                        break
        finally:
            self._task = None

    def _finish(self, batch: list[Op]) -> None:
        """Account for a committed batch, pass it on, and wake its callers."""
        self.batches += 1
        self.batched_ops += len(batch)
        inflight = self.inflight
        for op in batch:
            if op.kind in (OpKind.WRITE, OpKind.REMOVE):
                left = inflight[op.id] - 1
                if left <= 0:
                    del inflight[op.id]
                else:
                    inflight[op.id] = left
        self._on_committed(batch)
        for op in batch:
            future = op.future
            if future is not None and not future.done():
                if op.error is None:
                    future.set_result(op.result)
                else:
                    future.set_exception(op.error)

    def _lonely(self) -> bool:
        return all(op.kind == OpKind.REMOVE for op in self._pending)

    async def drain(self) -> None:
        """Commit everything submitted, removals waiting for company too."""
        self._draining = True
        self._start()
        if self._task is not None:
            await asyncio.shield(self._task)

    def shutdown(self) -> None:
        """Stop the commit thread (blocks; after :meth:`drain`)."""
        self._thread.shutdown(wait=True)
