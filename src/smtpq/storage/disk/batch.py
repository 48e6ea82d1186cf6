"""One commit batch of a disk queue, carried out in the commit thread: two flush waves.

A message exists iff both of its files exist. A batch, whatever its size, goes:

1. the new files (a write's envelope and meta, an update's new meta) are written in tmp_dir;
   the new envelopes are renamed into env_dir, the metas of removed messages moved out;
2. **wave 1** makes the new files and env_dir's names durable: one ``syncfs``, or the files'
   fdatasyncs and env_dir's fsync at once (:class:`~smtpq.storage.disk.sync.Flusher`);
3. the new metas are renamed into meta_dir (updates swap theirs in atomically);
4. **wave 2** fsyncs meta_dir (and corrupt_dir after a quarantine): the batch is durable, and
   only then do its callers learn that it is;
5. the envelopes of removed messages are moved out (not synced).

What a crash (of the machine) leaves, by step: (1) scratch files, which the next load deletes,
and maybe an envelope in env_dir without its meta, not a message: an *orphan* the load deletes;
(2, 3) the same, or a meta in place whose files were durable — a whole message, not yet
acknowledged; a removed message still whole (its removal was not acknowledged), or without its
meta (an orphan); an update's old meta or its new one, both durable; (4, 5) the batch as
acknowledged, and maybe a removed message's envelope without its meta (an orphan). A meta never
names a file that is not durable, so nothing acknowledged is lost, and an envelope alone is
never a message.

The Python work of a batch runs in one thread: spread over threads it would only contend for
the GIL. Only the syncs, which wait on the device, run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from smtpq.errors import MessageGone, QueueError
from smtpq.storage.disk.meta import CorruptError, Meta, encode_meta
from smtpq.storage.disk.spool import ENV_SUFFIX, META_SUFFIX, Spool, queue_error
from smtpq.storage.disk.sync import Flusher, SyncMode

__all__ = ["BatchWriter", "Effect", "Op", "OpKind"]

log = logging.getLogger(__name__)


class OpKind(StrEnum):
    """What an operation does to its message."""

    WRITE = "write"
    UPDATE = "update"
    REMOVE = "remove"
    QUARANTINE = "quarantine"


class Effect(StrEnum):
    """What a meta update does to the schedule once it is committed."""

    RESCHEDULE = "reschedule"
    HOLD = "hold"


class Op:
    """One storage operation waiting in, or carried by, a commit batch.

    After the batch, :attr:`error` is None and :attr:`result` the operation's result, or
    :attr:`error` says why it failed (:class:`~smtpq.errors.MessageGone`,
    :class:`~smtpq.errors.QueueError`).
    """

    __slots__ = (
        "claimed",
        "effect",
        "env",
        "error",
        "fn",
        "future",
        "id",
        "kind",
        "meta",
        "result",
    )

    def __init__(
        self,
        kind: OpKind,
        id: str,
        *,
        env: bytes | None = None,
        meta: Meta | None = None,
        fn: Callable[[Meta], Any] | None = None,
        effect: Effect | None = None,
        claimed: bool = False,
    ) -> None:
        self.kind = kind
        self.id = id
        self.env = env  # a write's envelope bytes
        self.meta = meta  # the new meta (write), or the meta after the update (update)
        self.fn = fn  # an update's change: applied to the meta, its result is the op's
        self.effect = effect
        self.claimed = claimed  # a write's: leased to the writer
        self.result: Any = None
        self.error: BaseException | None = None
        #: Where the caller awaits the outcome (set by the group committer).
        self.future: asyncio.Future[Any] | None = None


class _Unit:
    """The operations of one batch on one message, in the order they were submitted."""

    __slots__ = (
        "env_scratch",
        "fds",
        "id",
        "meta_scratch",
        "old_meta",
        "ops",
        "quarantine",
        "remove",
        "write",
    )

    def __init__(self, id: str) -> None:
        self.id = id
        self.ops: list[Op] = []
        self.write = False
        self.remove = False
        self.quarantine = False
        self.env_scratch: str | None = None
        self.meta_scratch: str | None = None
        self.old_meta: str | None = None  # a replaced or removed meta, moved to tmp_dir
        self.fds: list[int] = []  # scratch files still open, to be fsynced

    def fail(self, exc: BaseException) -> None:
        for op in self.ops:
            if op.error is None:
                op.error = exc

    @property
    def ok(self) -> bool:
        return any(op.error is None for op in self.ops)


class BatchWriter:
    """Carries out commit batches on a spool, one at a time (the commit thread)."""

    def __init__(self, spool: Spool, flusher: Flusher) -> None:
        self._spool = spool
        self._flusher = flusher
        #: At most this many operations in a batch: in fsync mode each new file is an open fd.
        self.max_batch = 128 if flusher.mode == SyncMode.FSYNC else 512
        self._by_syncfs = False  # how the current batch is flushed

    def commit(self, ops: list[Op]) -> None:
        """Carry out one batch; each op gets its result or its error."""
        try:
            self._spool.open()
        except QueueError as exc:
            for op in ops:
                op.error = exc
            return
        except OSError as exc:
            for op in ops:
                op.error = queue_error("queue directories unusable", exc)
            return
        units: dict[str, _Unit] = {}
        for op in ops:
            unit = units.get(op.id)
            if unit is None:
                unit = units[op.id] = _Unit(op.id)
            unit.ops.append(op)
            unit.write = unit.write or op.kind == OpKind.WRITE
            unit.quarantine = unit.quarantine or op.kind == OpKind.QUARANTINE
        files = sum(2 if op.kind == OpKind.WRITE else op.kind == OpKind.UPDATE for op in ops)
        self._by_syncfs = self._flusher.by_syncfs(files)
        todo = list(units.values())
        for unit in todo:
            self._prepare(unit)
        live = [u for u in todo if u.ok]
        # New envelopes go into place before they are durable: until its meta appears an
        # envelope is not a message, and the meta appears only after the first flush wave.
        writes, meta_changed = self._envelopes_in_metas_out(live)
        self._flush_new_files(live, writes, files)
        live = [u for u in live if u.ok]
        meta_changed = self._metas_in(live) or meta_changed
        # Flush wave 2: the batch is durable.
        if meta_changed:
            try:
                self._spool.fsync_dir("meta")
                if any(u.quarantine for u in live):
                    self._spool.fsync_dir("corrupt")
            except OSError as exc:
                for unit in live:
                    if not unit.ok:
                        continue
                    if unit.write:
                        self._undo_write(unit, exc)
                    else:
                        unit.fail(queue_error("cannot flush queue files", exc))
        self._envelopes_out(live)
        failed = [op for op in ops if isinstance(op.error, QueueError)]
        if failed:
            log.error("%d queue operation(s) failed: %s", len(failed), failed[0].error)

    def _scratch(self, data: bytes, unit: _Unit) -> str:
        """A scratch file holding ``data``; its fd is kept in ``unit.fds`` for the fsyncs of
        the first flush, unless that is a syncfs (or nothing)."""
        name, fd = self._spool.new_scratch(data)
        if self._by_syncfs or not self._flusher.durable:
            os.close(fd)
        else:
            unit.fds.append(fd)
        return name

    def _prepare(self, unit: _Unit) -> None:
        """Write the scratch files of one message (durable only after the first flush)."""
        try:
            if unit.write:
                op = unit.ops[0]
                assert op.env is not None
                assert op.meta is not None
                unit.env_scratch = self._scratch(op.env, unit)
                unit.meta_scratch = self._scratch(encode_meta(op.meta), unit)
                return
            if unit.quarantine:
                for op in unit.ops:
                    if op.kind != OpKind.QUARANTINE:
                        op.error = MessageGone(unit.id)
                return
            meta: Meta | None = None
            original = b""
            for op in unit.ops:
                if op.kind == OpKind.REMOVE:
                    unit.remove = True  # idempotent: a second removal is no error
                elif unit.remove:
                    op.error = MessageGone(unit.id)
                else:
                    assert op.fn is not None
                    if meta is None:
                        meta = self._spool.read_meta(unit.id)
                        original = encode_meta(meta)
                    op.result = op.fn(meta)
                    op.meta = Meta(meta.timestamp, meta.attempts, [], meta.held)
            if unit.remove or meta is None:
                return
            data = encode_meta(meta)
            if data != original:  # an idempotent change needs no write
                unit.meta_scratch = self._scratch(data, unit)
        except MessageGone as exc:
            unit.fail(exc)
        except CorruptError as exc:
            unit.fail(MessageGone(unit.id))
            self._spool.quarantine(unit.id, str(exc))
            unit.quarantine = True
        except OSError as exc:
            what = "cannot store message" if unit.write else "cannot update message"
            unit.fail(queue_error(what, exc))
            self._drop_scratch(unit)
        except Exception as exc:  # a bug must fail its operations, not the commit thread
            log.exception("queue operation on %s failed", unit.id)
            unit.fail(QueueError(f"queue storage failure: {exc!r}"))
            self._drop_scratch(unit)

    def _close_files(self, unit: _Unit) -> None:
        for fd in unit.fds:
            os.close(fd)
        unit.fds.clear()

    def _drop_scratch(self, unit: _Unit) -> None:
        self._close_files(unit)
        for name in (unit.env_scratch, unit.meta_scratch):
            if name is not None:
                self._spool.unlink(name, "tmp")
        unit.env_scratch = unit.meta_scratch = None

    def _undo_write(self, unit: _Unit, exc: OSError) -> None:
        """Take back a write that cannot be made durable: nothing half-written stays."""
        unit.fail(queue_error("cannot store message", exc))
        self._spool.unlink(unit.id + META_SUFFIX, "meta")
        self._spool.unlink(unit.id + ENV_SUFFIX, "env")
        self._drop_scratch(unit)

    def _envelopes_in_metas_out(self, live: list[_Unit]) -> tuple[list[_Unit], bool]:
        """New envelopes into place; metas of removed messages out (durable with the last
        flush, before their envelopes go). The units that wrote, and whether meta_dir changed.
        """
        writes: list[_Unit] = []
        meta_changed = False
        for unit in live:
            if unit.quarantine:
                if any(op.kind == OpKind.QUARANTINE for op in unit.ops):
                    self._spool.quarantine(unit.id, "envelope unreadable")
                    meta_changed = True
            elif unit.write:
                assert unit.env_scratch is not None
                try:
                    self._spool.move_in(unit.env_scratch, unit.id + ENV_SUFFIX, "env")
                except OSError as exc:
                    self._undo_write(unit, exc)
                    continue
                unit.env_scratch = None
                writes.append(unit)
            elif unit.remove:
                try:
                    unit.old_meta = self._spool.move_out(unit.id + META_SUFFIX, "meta")
                    meta_changed = meta_changed or unit.old_meta is not None
                except OSError as exc:
                    unit.fail(queue_error("cannot remove message", exc))
        return writes, meta_changed

    def _flush_new_files(self, live: list[_Unit], writes: list[_Unit], files: int) -> None:
        """Flush wave 1: every new file, and the new envelopes' names in env_dir, durable.

        Either one syncfs, or the files and env_dir fsynced (:class:`Flusher`). Units whose
        files could not be made durable fail, and nothing of them is left behind.
        """
        if not self._flusher.durable:
            return
        failed: list[tuple[list[_Unit], OSError]] = []
        if self._by_syncfs:
            if not writes and not any(u.meta_scratch for u in live):
                return
            try:
                self._flusher.syncfs(self._spool.fd("tmp"), files=files)
            except OSError as exc:
                failed.append((live, exc))
        else:
            fds = [fd for u in live for fd in u.fds]
            owners: list[_Unit | None] = [u for u in live for _ in u.fds]
            dirs: list[int] = []
            if writes:
                dirs.append(self._spool.fd("env"))
                owners.append(None)
            errors = self._flusher.fsync(fds, dirs, files=files)
            for unit in live:
                self._close_files(unit)
            for owner, error in zip(owners, errors, strict=True):
                if error is not None:  # env_dir's failure is every new envelope's
                    failed.append((writes if owner is None else [owner], error))
        for units, problem in failed:
            for unit in units:
                if not unit.ok:
                    continue
                if unit.write:
                    self._undo_write(unit, problem)
                elif unit.meta_scratch is not None:
                    unit.fail(queue_error("cannot update message", problem))
                    self._drop_scratch(unit)

    def _metas_in(self, live: list[_Unit]) -> bool:
        """New and updated metas into place; True when meta_dir changed."""
        changed = False
        for unit in live:
            if unit.meta_scratch is None or not unit.ok:
                continue
            try:
                if unit.write:
                    self._spool.move_in(unit.meta_scratch, unit.id + META_SUFFIX, "meta")
                elif self._spool.replace_meta(unit.meta_scratch, unit.id):
                    unit.old_meta = unit.meta_scratch
            except OSError as exc:
                if unit.write:
                    self._undo_write(unit, exc)
                else:
                    unit.fail(queue_error("cannot update message", exc))
                    self._drop_scratch(unit)
                continue
            unit.meta_scratch = None
            changed = True
        return changed

    def _envelopes_out(self, live: list[_Unit]) -> None:
        """Last, the envelopes of removed messages out, and the files taken out of the queue
        kept for reuse. Not fsynced: after a crash an envelope without its meta is an orphan,
        which load() deletes."""
        old: list[str] = []
        for unit in live:
            if unit.remove and unit.ok:
                name = self._spool.move_out(unit.id + ENV_SUFFIX, "env")
                if name is not None:
                    old.append(name)
            # After a failed flush, the old meta may be what a crash brings back: keep it
            # as it is (a later load deletes it).
            if unit.old_meta is not None and unit.ok:
                old.append(unit.old_meta)
        self._spool.recycle(old)
