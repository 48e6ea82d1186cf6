"""JournalStorage: the storage contract over an append-only journal; see
:mod:`smtpq.storage.journal`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from smtpq.envelope import HEAD_MIN, Envelope
from smtpq.errors import EnvelopeFormatError, MessageGone, QueueError
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, StoredMessage, new_id
from smtpq.storage.disk.committer import REMOVE_LINGER
from smtpq.storage.disk.meta import Meta
from smtpq.storage.disk.reader import record_of
from smtpq.storage.disk.spool import queue_error
from smtpq.storage.journal.index import Entry, Index
from smtpq.storage.journal.records import Kind, encode
from smtpq.storage.journal.recovery import Recovered, recover
from smtpq.storage.journal.segments import SegmentFiles
from smtpq.storage.schedule import LocallyScheduled, LocalSchedule, id_key
from smtpq.storage.thread import CallThread

__all__ = ["DEFAULT_SEGMENT_SIZE", "JournalStorage"]

log = logging.getLogger("smtpq.storage.journal")
T = TypeVar("T")

#: Bytes after which appends go to a new segment.
DEFAULT_SEGMENT_SIZE = 64 << 20
#: Bytes of envelopes that one round of compaction moves at most.
_COMPACT_ROUND = 8 << 20
_HEAD_READ = 4096


@dataclass(slots=True, eq=False)
class _Op:
    """One change waiting for the next append."""

    kind: Kind
    id: str
    future: asyncio.Future[Any]
    env: bytes = b""
    meta: Meta | None = None  # a WRITE's first state
    claimed: bool = False
    moved_from: int | None = None  # compaction: the segment the message leaves
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)


class JournalStorage(LocallyScheduled):
    """A durable queue in one directory of append-only segment files.

    Every change is a record appended to the newest segment; the changes that arrive while one
    append runs go together in the next (group commit), and each append is one ``write`` and
    one ``fdatasync``: a message is durable, with its directory entry, after a single flush.
    The messages' states and the places of their envelopes are kept in memory; envelopes are
    read back from the files only for retries and listings.

    :param path: the journal directory (created ``0700`` if missing).
    :param corrupt_dir: where damaged records are kept; default ``path/corrupt``.
    :param durable: flush every append (the default). ``False`` is unsafe — no durability
        against power loss — and meant for tests and benchmarks.
    :param segment_size: bytes after which appends go to a new segment.
    :param lease_timeout: seconds a claim lasts unless renewed.
    :param read_only: only read: for a listing beside the daemon that owns the journal (every
        change raises :class:`~smtpq.errors.QueueError`, and the replay repairs nothing).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        corrupt_dir: str | os.PathLike[str] | None = None,
        durable: bool = True,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        lease_timeout: float = 60.0,
        read_only: bool = False,
    ) -> None:
        self.path = os.path.abspath(path)
        self.read_only = read_only
        self.corrupt_dir = os.path.abspath(corrupt_dir or os.path.join(self.path, "corrupt"))
        self.segment_size = segment_size
        self.lease_timeout = lease_timeout
        self._files = SegmentFiles(self.path, self.corrupt_dir, durable=durable)
        self._index = Index()
        self._schedule = LocalSchedule()
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._closed = False
        # One thread appends, and replays at start (the order of the records is the order of
        # the changes); reads have threads of their own.
        self._writer = CallThread("smtpq-journal-append")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="smtpq-journal-read")
        self._pending: list[_Op] = []
        self._run_task: asyncio.Task[None] | None = None
        self._compact_task: asyncio.Task[None] | None = None
        # Ids whose last change failed to reach the journal: their state is appended again.
        self._dirty: set[str] = set()
        # Set while removals alone wait for company: done by the next other change.
        self._company: asyncio.Future[None] | None = None
        self._recovered = Recovered()
        self._quarantined = 0
        self.batches = 0
        self.batched_ops = 0
        self.compacted = 0

    # -- appending -----------------------------------------------------------------------------

    async def _submit(self, kind: Kind, id: str, **fields: Any) -> Any:
        if self._closed:
            raise QueueError("the queue storage is closed")
        if self.read_only:
            raise QueueError("the queue journal is open for reading only")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(kind, id, future, **fields))
        if kind != Kind.REMOVE:
            self._join_removals()
        if self._run_task is None:
            self._run_task = asyncio.create_task(self._run())
        return await future

    def _join_removals(self) -> None:
        """Removals waiting for company have it: they go with the next append."""
        if self._company is not None:
            _settle(self._company, None)

    async def _run(self) -> None:
        try:
            while self._pending:
                if not self._closed and all(op.kind == Kind.REMOVE for op in self._pending):
                    # Removals alone wait a little for a write to share its append with (see
                    # smtpq.storage.disk.committer): at one session the next message carries
                    # them, and one hand-off to the append thread serves both.
                    # A future and a timer: asyncio.wait_for would cost a task per wait.
                    loop = asyncio.get_running_loop()
                    self._company = company = loop.create_future()
                    timer = loop.call_later(REMOVE_LINGER, _settle, company, None)
                    try:
                        await company
                    finally:
                        timer.cancel()
                        self._company = None
                batch, self._pending = self._pending, []
                try:
                    await self._append(batch)
                except Exception as exc:  # a bug: fail the batch, never leave a caller waiting
                    log.exception("journal %s: append failed", self.path)
                    _fail(batch, QueueError(f"cannot write to the queue journal: {exc}"))
                self._maintain()
        finally:
            self._run_task = None

    def _records(self, batch: list[_Op]) -> tuple[list[_Op], list[bytes], list[tuple[int, int]]]:
        """The ops that still need a record, their records' bytes and where each record and
        its envelope begin in the batch. A state change is appended as the message's whole
        state at this moment, once per batch, however many changes asked for it."""
        for id in self._dirty:
            kind = Kind.META if id in self._index else Kind.REMOVE
            batch.append(_Op(kind, id, _unawaited()))
        self._dirty.clear()
        ops: list[_Op] = []
        chunks: list[bytes] = []
        places: list[tuple[int, int]] = []
        changed: dict[str, _Op] = {}
        pos = 0
        for op in batch:
            meta = op.meta
            if op.kind == Kind.META or op.moved_from is not None:
                entry = self._index.get(op.id)
                if entry is None or (op.moved_from is not None and entry.segment != op.moved_from):
                    # Removed meanwhile (or moved already): nothing to append.
                    _settle(op.future, MessageGone(op.id) if op.moved_from is None else None)
                    continue
                if op.kind == Kind.META and op.id in changed:
                    changed[op.id].waiters.append(op.future)
                    continue
                changed[op.id] = op
                meta = entry.meta
            record = encode(op.kind, op.id, meta, op.env)
            size = sum(len(c) for c in record)
            ops.append(op)
            places.append((pos, pos + size - len(op.env)))
            chunks.extend(record)
            pos += size
        return ops, chunks, places

    async def _append(self, batch: list[_Op]) -> None:
        ops, chunks, places = self._records(batch)
        if not ops:
            return
        # Removals alone are written, not flushed: see remove().
        flush = any(op.kind != Kind.REMOVE for op in ops)
        try:
            segment, start = await self._writer.run(
                self._files.append, b"".join(chunks), self.segment_size, flush
            )
        except OSError as exc:
            self._dirty.update(op.id for op in ops if op.kind != Kind.WRITE)
            _fail(ops, queue_error("cannot write to the queue journal", exc))
            return
        self.batches += 1
        self.batched_ops += len(ops)
        self._index.grown(segment, self._files.size)
        for op, (offset, env_offset) in zip(ops, places, strict=True):
            result: Any = None
            if op.kind == Kind.WRITE:
                result = self._written(op, segment, start + offset, start + env_offset)
            for future in (op.future, *op.waiters):
                _settle(future, result)

    def _written(self, op: _Op, segment: int, offset: int, env_offset: int) -> str | None:
        """Record where a WRITE went; the new id for a new message."""
        size = env_offset - offset + len(op.env)
        if op.moved_from is not None:  # compaction: the message stays what it is
            entry = self._index.get(op.id)
            if entry is not None and entry.segment == op.moved_from:
                self._index.put(op.id, Entry(entry.meta, segment, env_offset, len(op.env), size))
            return None
        assert op.meta is not None
        self._index.put(op.id, Entry(op.meta, segment, env_offset, len(op.env), size))
        lease = op.meta.timestamp + self.lease_timeout if op.claimed else None
        self._schedule.add(op.id, op.meta.timestamp, lease_until=lease)
        return op.id

    # -- segments: deletion and compaction -----------------------------------------------------

    def _maintain(self) -> None:
        """Start deleting or compacting old segments in the background, if there is reason."""
        if self._compact_task is not None or self._closed:
            return
        active = self._files.active
        if (
            self._index.deletable(active) is None
            and self._index.to_compact(active, 2 * self.segment_size) is None
        ):
            return
        self._compact_task = asyncio.create_task(self._compact())

    async def _compact(self) -> None:
        try:
            while not self._closed:
                active = self._files.active
                oldest = self._index.deletable(active)
                if oldest is not None:
                    await self._writer.run(self._files.delete, oldest)
                    self._index.dropped(oldest)
                    log.debug("journal %s: segment %d deleted", self.path, oldest)
                    continue
                oldest = self._index.to_compact(active, 2 * self.segment_size)
                if oldest is None:
                    return
                await self._move_from(oldest)
        except (OSError, QueueError) as exc:
            log.warning("journal %s: compaction failed: %s", self.path, exc)
        finally:
            self._compact_task = None

    async def _move_from(self, segment: int) -> None:
        """Append again the envelopes of (up to a round of) the live messages of ``segment``,
        read in one call of a reader thread."""
        ids, places, size = [], [], 0
        for id in self._index.by_segment.get(segment, ()):
            entry = self._index.entries[id]
            ids.append(id)
            places.append((segment, entry.env_offset, entry.env_size))
            size += entry.env_size
            if size >= _COMPACT_ROUND:
                break
        envs = await self._read_many(places)
        # A message removed meanwhile is not moved: the append leaves it out (_records).
        moves = [
            self._submit(Kind.WRITE, id, env=env, moved_from=segment)
            for id, env in zip(ids, envs, strict=True)
            if env is not None
        ]
        await asyncio.gather(*moves)
        self.compacted += len(moves)

    # -- records -------------------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """Store a message durably; see :meth:`QueueStorage.write`.

        Raises :class:`~smtpq.errors.QueueError` (reply ``451 4.3.0``) on a full disk, a
        permission or an I/O error; nothing of the message is left behind then.
        """
        await self._ensure_loaded()
        meta = Meta(float(timestamp))
        id = new_id(timestamp)
        result: str = await self._submit(
            Kind.WRITE, id, env=envelope.to_bytes(), meta=meta, claimed=claimed
        )
        return result

    def _entry(self, id: str) -> Entry:
        entry = self._index.get(id) if isinstance(id, str) else None
        if entry is None:
            raise MessageGone(id)
        return entry

    async def _change(self, id: str, change: Callable[[Meta], T]) -> T:
        """Apply ``change`` to the state of ``id`` and append the new state."""
        await self._ensure_loaded()
        result = change(self._entry(id).meta)
        await self._submit(Kind.META, id)
        return result

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """See :meth:`QueueStorage.set_timestamp`."""
        reply = last_reply.to_dict() if last_reply is not None else None

        def change(meta: Meta) -> None:
            meta.reschedule(timestamp, reply)
            self._schedule.reschedule(id, meta.timestamp)

        await self._change(id, change)

    async def increment_attempts(self, id: str) -> int:
        """See :meth:`QueueStorage.increment_attempts`."""
        return await self._change(id, Meta.count_attempt)

    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """See :meth:`QueueStorage.set_recipients_delivered`."""
        new = {int(i) for i in indexes}
        await self._change(id, lambda meta: meta.add_delivered(new))

    async def set_held(self, id: str, held: bool) -> None:
        """See :meth:`QueueStorage.set_held`; persisted, so a held message stays held."""

        def change(meta: Meta) -> None:
            meta.held = held
            self._schedule.hold(id, held)

        await self._change(id, change)

    async def remove(self, id: str) -> None:
        """See :meth:`QueueStorage.remove`.

        The removal is written to the journal when this returns, so that it survives the
        process (a SIGKILL, a crash of the daemon). It waits up to ``REMOVE_LINGER`` for a
        change to share its append with (at one session, the next message's write), and is
        flushed with the next append that flushes, or by the kernel's write-back of dirty
        pages, but never waits for a flush of its own: a power cut before then delivers the
        message again, never loses one. Postfix does not flush the removal of a delivered
        queue file either.
        """
        await self._ensure_loaded()
        if self._index.remove(id) is None:
            return
        self._schedule.discard(id)
        await self._submit(Kind.REMOVE, id)

    async def _read_many(self, places: list[tuple[int, int, int]]) -> list[bytes | None]:
        """:meth:`SegmentFiles.read_many` in a reader thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, self._files.read_many, places)
        except OSError as exc:
            raise queue_error("cannot read the queue journal", exc) from exc

    async def _envelope_bytes(self, id: str, size: int | None = None) -> tuple[Entry, bytes]:
        """A message's entry and its envelope (its first ``size`` bytes), read where it is
        now: compaction may move it while the read runs."""
        for _ in range(3):
            entry = self._entry(id)
            wanted = min(size or entry.env_size, entry.env_size)
            (data,) = await self._read_many([(entry.segment, entry.env_offset, wanted)])
            if data is not None:
                return entry, data
        raise QueueError(f"cannot read message {id}: it keeps moving")

    async def get_entry(self, id: str) -> StoredMessage:
        """See :meth:`QueueStorage.get_entry`.

        A message whose envelope is damaged is kept in the corrupt directory and is gone
        (:class:`~smtpq.errors.MessageGone`).
        """
        await self._ensure_loaded()
        entry, data = await self._envelope_bytes(id)
        try:
            envelope = Envelope.from_bytes(data)
        except EnvelopeFormatError as exc:
            if not self.read_only:
                await self._quarantine(id, data, exc)
            raise MessageGone(id) from None
        return record_of(StoredMessage.from_written, id, envelope, entry.meta)

    async def _quarantine(self, id: str, data: bytes, exc: Exception) -> None:
        try:
            kept = await self._writer.run(self._files.keep_once, f"{id}.env", data)
        except OSError as error:
            raise queue_error("cannot quarantine a damaged message", error) from error
        log.error("journal %s: message %s damaged (%s), kept in %s", self.path, id, exc, kept)
        self._quarantined += 1
        if self._index.remove(id) is not None:
            self._schedule.discard(id)
            await self._submit(Kind.REMOVE, id)

    async def get_infos(self, ids: Sequence[str]) -> list[MessageInfo]:
        """See :meth:`QueueStorage.get_infos`: the state from memory, and only the start of
        each envelope from the journal, all of them in one call of a reader thread."""
        await self._ensure_loaded()
        wanted = [(id, entry) for id in ids if (entry := self._index.get(id)) is not None]
        heads = await self._read_many(
            [(e.segment, e.env_offset, min(e.env_size, _HEAD_READ)) for _, e in wanted]
        )
        infos = []
        for (id, entry), head in zip(wanted, heads, strict=True):
            try:
                if head is None:  # moved by compaction meanwhile: read it where it is now
                    entry, head = await self._envelope_bytes(id, _HEAD_READ)
                if len(head) >= HEAD_MIN and len(head) < Envelope.head_size(head):
                    entry, head = await self._envelope_bytes(id, Envelope.head_size(head))
                infos.append(record_of(MessageInfo.from_head, id, head, entry.meta))
            except (KeyError, EnvelopeFormatError):
                continue
        return infos

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """See :meth:`QueueStorage.iter_ids`: pages of the schedule's ids."""
        await self._ensure_loaded()
        async for ids in self._schedule.pages(page):
            yield ids

    # -- load ----------------------------------------------------------------------------------

    async def load(self) -> list[tuple[float, str]]:
        """Every message as ``(timestamp, id)``; see :meth:`QueueStorage.load`.

        The first call replays the journal (see :mod:`smtpq.storage.journal.recovery`); later
        ones rebuild the schedule from the index in memory, which is the journal's state.
        """
        async with self._load_lock:
            await self._reload()
        return self._schedule.entries()

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            async with self._load_lock:
                if not self._loaded:
                    await self._reload()

    async def _reload(self) -> None:
        if self._closed:
            raise QueueError("the queue storage is closed")
        if not self._loaded:
            try:
                found = await self._writer.run(
                    functools.partial(recover, self._files, repair=not self.read_only)
                )
            except OSError as exc:
                raise queue_error("cannot read the queue journal", exc) from exc
            self._index, self._recovered = found.index, found
            self._loaded = True
            segments = len(found.index.segment_bytes)
            log.info(
                "journal %s: loaded %d queued messages from %d segment%s"
                " (%d damaged stretches set aside, %d torn tails cut off)",
                self.path, len(found.index), segments, "" if segments == 1 else "s",
                found.corrupt, found.torn_tails,
            )  # fmt: skip
        entries = self._index.entries.items()
        times = {id_key(id): entry.meta.timestamp for id, entry in entries}
        held = {id_key(id) for id, entry in entries if entry.meta.held}
        # Keep the leases this object holds: a reload must not hand an attempt to a second
        # worker.
        self._schedule.rebuild(times, held, self._schedule.leases())

    async def get_info(self) -> dict[str, Any]:
        """``size`` (messages stored), ``held``, ``active`` (being attempted), ``oldest``, and
        the journal's own figures: ``segments`` and ``journal_bytes`` (on disk), ``live_bytes``
        (of records that keep a live message), ``corrupt`` (damaged records and messages found
        by this object), ``corrupt_stored`` (files in the corrupt directory), ``torn_tails``
        (interrupted appends cut off at the start), ``compacted`` (messages moved to a newer
        segment), ``batches`` and ``batched_ops`` (their ratio is the group-commit factor).
        """
        await self._ensure_loaded()
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(self._readers, self._files.corrupt_stored)
        return {
            "size": len(self._index),
            **self._schedule.stats(),
            "segments": len(self._index.segment_bytes),
            "journal_bytes": self._index.total_bytes,
            "live_bytes": self._index.total_live,
            "corrupt": self._recovered.corrupt + self._quarantined,
            "corrupt_stored": stored,
            "torn_tails": self._recovered.torn_tails,
            "compacted": self.compacted,
            "batches": self.batches,
            "batched_ops": self.batched_ops,
        }

    async def close(self) -> None:
        """Finish the changes under way (removals waiting for company go now), then stop the
        threads and close the journal."""
        if self._closed:
            return
        self._closed = True
        self._join_removals()  # removals waiting for company go now
        for task in (self._compact_task, self._run_task):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._files.close()

    # -- schedule ------------------------------------------------------------------------------

    async def flush(self, now: float, ids: Sequence[str] | None = None) -> int:
        """See :meth:`QueueStorage.flush`; as in DiskStorage the new time is kept in memory."""
        await self._ensure_loaded()
        return len(self._schedule.flush(now, ids))


def _unawaited() -> asyncio.Future[Any]:
    """A future for a change nobody waits for (a retried state): its error is only logged."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _fail(ops: list[_Op], error: QueueError) -> None:
    for op in ops:
        for future in (op.future, *op.waiters):
            _settle(future, error)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
