"""DiskStorage: the storage contract over a spool, its group committer and its schedule."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from smtpq.envelope import Envelope
from smtpq.errors import MessageGone, QueueError
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, StoredMessage, is_valid_id, new_id
from smtpq.storage.disk import reader
from smtpq.storage.disk.batch import BatchWriter, Effect, Op, OpKind
from smtpq.storage.disk.committer import GroupCommitter
from smtpq.storage.disk.meta import CorruptError, Meta
from smtpq.storage.disk.scan import scan_spool
from smtpq.storage.disk.spool import Spool, check_id, queue_error
from smtpq.storage.disk.sync import Flusher, SyncMode
from smtpq.storage.schedule import LocallyScheduled, LocalSchedule, id_key, key_id

__all__ = ["DiskStorage"]


class DiskStorage(LocallyScheduled):
    """A durable queue in two directories of small files; see :mod:`smtpq.storage.disk`.

    :param env_dir: directory of the envelope files (created ``0700`` if missing).
    :param meta_dir: directory of the meta files.
    :param tmp_dir: scratch directory; default ``meta_dir/tmp``. It must be on the same
        filesystem as the other directories, so that renames are atomic.
    :param corrupt_dir: where bad entries are moved; default ``meta_dir/corrupt``.
    :param sync: a :class:`~smtpq.storage.disk.sync.SyncMode` or its string: ``"auto"``
        (default), ``"fsync"``, ``"syncfs"``, or ``"none"`` (unsafe: no durability against
        power loss; for tests and benchmarks).
    :param lease_timeout: seconds a claim lasts unless renewed.
    :param threads: worker threads that fsync the files of a batch in parallel.
    """

    def __init__(
        self,
        env_dir: str | os.PathLike[str],
        meta_dir: str | os.PathLike[str],
        tmp_dir: str | os.PathLike[str] | None = None,
        *,
        corrupt_dir: str | os.PathLike[str] | None = None,
        sync: SyncMode | Literal["auto", "fsync", "syncfs", "none"] = SyncMode.AUTO,
        lease_timeout: float = 60.0,
        threads: int = 8,
    ) -> None:
        self._flusher = Flusher(sync, threads=threads)
        self.env_dir = os.path.abspath(env_dir)
        self.meta_dir = os.path.abspath(meta_dir)
        self.tmp_dir = os.path.abspath(tmp_dir or os.path.join(self.meta_dir, "tmp"))
        self.corrupt_dir = os.path.abspath(corrupt_dir or os.path.join(self.meta_dir, "corrupt"))
        self._spool = Spool(
            self.env_dir,
            self.meta_dir,
            self.tmp_dir,
            self.corrupt_dir,
            durable=self._flusher.durable,
        )
        #: The durability in force (``"auto"`` only where syncfs is usable).
        self.sync: SyncMode = self._flusher.mode
        self.lease_timeout = lease_timeout
        self._committer = GroupCommitter(BatchWriter(self._spool, self._flusher), self._apply)
        self._schedule = LocalSchedule()
        self._loaded = False
        self._load_lock = asyncio.Lock()
        # While load() scans, the outcome of every change made meanwhile, so that the rebuilt
        # schedule keeps it: id -> (timestamp, held), or None when removed.
        self._touched: dict[str, tuple[float, bool] | None] | None = None
        self._closed = False
        # The I/O pool serves reads and load() (the committer and the flusher have their own).
        self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="smtpq-disk-io")
        self._orphans_removed = 0
        self._scratch_removed = 0

    # -- group commit --------------------------------------------------------------------------

    async def _submit(self, op: Op) -> Any:
        if self._closed:
            raise QueueError("the queue storage is closed")
        return await self._committer.submit(op)

    async def _update(
        self, id: str, fn: Callable[[Meta], Any], effect: Effect | None = None
    ) -> Any:
        return await self._submit(Op(OpKind.UPDATE, check_id(id), fn=fn, effect=effect))

    def _note(self, id: str, state: tuple[float, bool] | None) -> None:
        if self._touched is not None:
            self._touched[id] = state

    def _apply(self, batch: list[Op]) -> None:
        """Apply a committed batch to the schedule (event loop)."""
        schedule = self._schedule
        for op in batch:
            if op.error is None:
                if op.kind == OpKind.WRITE:
                    assert op.meta is not None
                    lease = op.meta.timestamp + self.lease_timeout if op.claimed else None
                    schedule.add(op.id, op.meta.timestamp, lease_until=lease)
                    self._note(op.id, (op.meta.timestamp, False))
                    op.result = op.id
                elif op.kind in (OpKind.REMOVE, OpKind.QUARANTINE):
                    schedule.discard(op.id)
                    self._note(op.id, None)
                elif op.meta is not None:
                    self._apply_update(op)
            elif isinstance(op.error, MessageGone) and op.kind == OpKind.UPDATE:
                schedule.discard(op.id)  # gone, or quarantined
                self._note(op.id, None)

    def _apply_update(self, op: Op) -> None:
        schedule, id, meta = self._schedule, op.id, op.meta
        assert meta is not None
        if id in schedule:
            if op.effect == Effect.RESCHEDULE:
                schedule.reschedule(id, meta.timestamp)  # ends the lease, even at the same time
            elif op.effect == Effect.HOLD:
                schedule.hold(id, meta.held)
            self._note(id, (schedule.timestamp(id), schedule.is_held(id)))
        elif self._loaded:  # stored, but written by another storage object since our load
            schedule.add(id, meta.timestamp, held=meta.held)
            self._note(id, (meta.timestamp, meta.held))

    # -- records -------------------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """Store a message durably; see :meth:`QueueStorage.write`.

        Raises :class:`~smtpq.errors.QueueError` (reply ``451 4.3.0``) on a full disk, a
        permission or an I/O error; nothing half-written is left behind then.
        """
        id = new_id(timestamp)
        meta = Meta(float(timestamp))
        op = Op(OpKind.WRITE, id, env=envelope.to_bytes(), meta=meta, claimed=claimed)
        result: str = await self._submit(op)
        return result

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """See :meth:`QueueStorage.set_timestamp`."""
        reply = last_reply.to_dict() if last_reply is not None else None
        await self._update(id, lambda meta: meta.reschedule(timestamp, reply), Effect.RESCHEDULE)

    async def increment_attempts(self, id: str) -> int:
        """See :meth:`QueueStorage.increment_attempts`."""
        result: int = await self._update(id, Meta.count_attempt)
        return result

    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """See :meth:`QueueStorage.set_recipients_delivered`."""
        new = {int(i) for i in indexes}
        await self._update(id, lambda meta: meta.add_delivered(new))

    async def remove(self, id: str) -> None:
        """See :meth:`QueueStorage.remove`; durable when it returns."""
        await self._submit(Op(OpKind.REMOVE, check_id(id)))

    async def get_entry(self, id: str) -> StoredMessage:
        """See :meth:`QueueStorage.get_entry`.

        An entry whose files are damaged is moved to the corrupt directory and is gone
        (:class:`~smtpq.errors.MessageGone`).
        """
        id = check_id(id)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io_pool, reader.read_entry, self._spool, id)
        except OSError as exc:
            raise queue_error("cannot read message", exc) from exc
        except CorruptError:
            await self._submit(Op(OpKind.QUARANTINE, id))
            raise MessageGone(id) from None

    async def get_infos(self, ids: Sequence[str]) -> list[MessageInfo]:
        """See :meth:`QueueStorage.get_infos`: one worker-thread call for all of ``ids``,
        reading each meta file and only the start of each envelope file (not the message).
        """
        wanted = [id for id in ids if isinstance(id, str) and is_valid_id(id)]
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io_pool, reader.read_infos, self._spool, wanted)
        except OSError as exc:
            raise queue_error("cannot read messages", exc) from exc

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """See :meth:`QueueStorage.iter_ids`: from the schedule when it is loaded, else from
        the names in the meta directory (a listing need not read a million files first)."""
        if self._loaded:
            async for ids in self._schedule.pages(page):
                yield ids
            return
        loop = asyncio.get_running_loop()
        try:
            keys = await loop.run_in_executor(self._io_pool, reader.meta_keys, self._spool)
        except OSError as exc:
            raise queue_error("cannot list the queue", exc) from exc
        for start in range(0, len(keys), page):
            yield [key_id(key) for key in keys[start : start + page]]

    # -- load ----------------------------------------------------------------------------------

    async def load(self) -> list[tuple[float, str]]:
        """Rebuild the schedule from the meta files; see :meth:`QueueStorage.load`.

        Never stops at a bad entry (see :mod:`smtpq.storage.disk.scan`); the bad ones are
        counted in :meth:`get_info`. Writes and removals may go on meanwhile. The other
        methods load on first use, without building this list.
        """
        async with self._load_lock:
            await self._reload()
        return self._schedule.entries()

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            async with self._load_lock:
                if not self._loaded:  # else another task loaded it while this one waited
                    await self._reload()

    async def _reload(self) -> None:
        """Scan the directories and rebuild the schedule (under the load lock)."""
        loop = asyncio.get_running_loop()
        self._touched = {}
        try:
            found = await loop.run_in_executor(
                self._io_pool, scan_spool, self._spool, self._committer.inflight, self._is_closed
            )
            touched = self._touched
        finally:
            self._touched = None
        self._orphans_removed += found.orphans
        self._scratch_removed += found.scratch
        for id, state in touched.items():
            key = id_key(id)
            if state is None:
                found.found.pop(key, None)
                found.held.discard(key)
            else:
                found.found[key] = state[0]
                if state[1]:
                    found.held.add(key)
                else:
                    found.held.discard(key)
        # Keep the leases this object holds: a reload must not hand an attempt to a second
        # worker.
        self._schedule.rebuild(found.found, found.held, self._schedule.leases())
        self._loaded = True

    def _is_closed(self) -> bool:
        return self._closed

    async def get_info(self) -> dict[str, Any]:
        """``size`` (messages stored), ``held``, ``active`` (being attempted), ``oldest``, and
        what an administrator wants to know about the disk:

        ``corrupt``: entries this object moved to the corrupt directory; ``corrupt_stored``:
        entries in that directory; ``orphans_removed`` and ``scratch_removed``: leftovers of
        interrupted operations deleted by ``load()``; ``batches`` and ``batched_ops``: commit
        batches run and the operations they carried (their ratio is the group-commit factor).
        """
        await self._ensure_loaded()
        return {
            "size": len(self._schedule),
            **self._schedule.stats(),
            "corrupt": self._spool.quarantined,
            "corrupt_stored": self._spool.corrupt_stored,
            "orphans_removed": self._orphans_removed,
            "scratch_removed": self._scratch_removed,
            "batches": self._committer.batches,
            "batched_ops": self._committer.batched_ops,
        }

    async def close(self) -> None:
        """Finish the operations under way, then stop the worker threads."""
        self._closed = True
        async with self._load_lock:
            with contextlib.suppress(Exception):
                await self._committer.drain()  # removals still waiting for company go now
            await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        # Waits for reads still running before their directory fds are closed.
        self._committer.shutdown()
        self._flusher.close()
        self._io_pool.shutdown(wait=True)
        self._spool.close()

    # -- schedule ------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int) -> list[str]:
        """See :meth:`QueueStorage.claim`. The files of several messages claimed at once are
        asked for at once, in the background (:func:`~smtpq.storage.disk.reader.read_ahead`)."""
        ids = await super().claim(now, limit)
        if len(ids) > 1 and not self._closed:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: closing
                self._io_pool.submit(reader.read_ahead, self._spool, ids)
        return ids

    async def flush(self, now: float, ids: Sequence[str] | None = None) -> int:
        """See :meth:`QueueStorage.flush`; as in DictStorage the new time is kept in memory."""
        await self._ensure_loaded()
        done = self._schedule.flush(now, ids)
        for id in done:
            self._note(id, (now, False))
        return len(done)

    async def set_held(self, id: str, held: bool) -> None:
        """See :meth:`QueueStorage.set_held`; persisted, so a held message stays held."""
        await self._ensure_loaded()

        def change(meta: Meta) -> None:
            meta.held = held

        await self._update(id, change, Effect.HOLD)
