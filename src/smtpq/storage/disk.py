"""DiskStorage: the durable default — two small files per message, synced, renamed into place.

Layout (every file ``0600``, directories this storage creates ``0700``)::

    env_dir/<id>.env      the envelope, Envelope.to_bytes(); written once, never changed
    meta_dir/<id>.meta    next attempt, attempts, delivered recipients, held, last reply
    tmp_dir/              scratch files (default meta_dir/tmp), renamed into place when durable
    corrupt_dir/          quarantined entries (default meta_dir/corrupt); load() never reads it

A message exists iff both of its files exist: ``write`` renames the ``.env`` then the ``.meta``
into place, ``remove`` takes the ``.meta`` then the ``.env`` away. A crash in between leaves an
*orphan* that :meth:`DiskStorage.load` resolves by that rule (an ``.env`` alone is deleted, a
``.meta`` alone is quarantined: its envelope is gone). A meta update writes a new file and
swaps it in atomically (``renameat2(RENAME_EXCHANGE)``, or a plain rename where the filesystem
has no exchange).

Ids are those of :func:`~smtpq.storage.base.new_id` (32 lowercase hex digits, time-ordered).
Only that form is accepted from callers (anything else is gone:
:class:`~smtpq.errors.MessageGone`), so an id typed into an admin tool cannot name a path outside
the queue directories.

Meta file format, version 1 — one header line, then a JSON object (UTF-8), then a newline::

    smtpq-meta 1 <crc32 of the JSON bytes, 8 lowercase hex digits>\\n
    {"timestamp":1800000000.0,"attempts":0,"delivered":[],"held":false,"last_reply":null}\\n

``delivered`` holds recipient indexes into the list as first written; ``last_reply`` is null or
:meth:`~smtpq.reply.Reply.to_dict`. A reader rejects any other magic, version, checksum or shape
(the entry is quarantined), so a later format can never be misread as this one. Nothing here is
pickled: a copied queue directory cannot run code.

Durability (``sync``). Every operation goes through *group commit*: while one batch is being
committed the next one gathers (no timer: a lone write is committed at once). A removal alone
waits up to :data:`_REMOVE_LINGER` for company: only the attempt that delivered the message
awaits it, and at low load the next message's write then carries it in the same commit (one
hand-off to the commit thread and one flush of meta_dir instead of two each). A batch writes its
new files in tmp_dir (in a worker thread), makes them durable, renames the envelopes into
place and fsyncs env_dir, then renames the metas into place (and takes those of removed
messages away) and fsyncs meta_dir: two directory fsyncs per batch, whatever its size.

* ``"fsync"``: each new file is fsynced, in parallel threads (the device merges the flushes
  of concurrent fsyncs), before a meta names it.
* ``"syncfs"``: one ``syncfs(2)`` per batch makes its new files durable. This flushes everything
  dirty on the filesystem, other programs' data included, so a spool that shares its
  filesystem with a heavy writer waits for that writer's data too. Only since Linux 5.8 does
  syncfs report write-back errors, hence the version check.
* ``"auto"`` (default): per batch, ``"fsync"`` for a few new files (a lone write does not wait
  for other programs' data); for more than :data:`_SYNCFS_FROM`, whichever of the two cost
  less lately (one syncfs usually, unless other programs keep much dirty data on the same
  filesystem); ``"fsync"`` where syncfs is not usable.
* ``"none"``: **unsafe** — no fsync at all. Renames stay atomic, so a killed process loses
  nothing, but a power failure or kernel crash can lose or empty messages that were
  acknowledged. For tests and benchmarks only.

Files taken out of the queue (removed messages, replaced metas) are moved to tmp_dir and reused,
inode and blocks, for the next scratch files (up to :data:`_POOL_SIZE`; the rest are unlinked,
and so are all of them when the storage closes), so that a busy queue neither frees nor
allocates inodes and blocks: on ext4 without a journal, creating files where many were deleted
in the last minutes is many times slower, and on a filesystem mounted with ``discard`` every
freed block costs a TRIM. A removed message's bytes thus stay in tmp_dir (owner-only) until its
file is overwritten by a new message, as the blocks of an unlinked file stay on the disk.

Every blocking call runs in worker threads, never on the event loop. One process owns a queue
directory: its schedule (:class:`~smtpq.storage.schedule.LocalSchedule`) lives in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import math
import os
import platform
import re
import secrets
import sys
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from smtpq.envelope import HEAD_MIN, Envelope
from smtpq.errors import EnvelopeFormatError, MessageGone, QueueError
from smtpq.reply import Reply, ReplyDict
from smtpq.storage.base import MessageInfo, StoredMessage, is_valid_id, new_id
from smtpq.storage.schedule import LocallyScheduled, LocalSchedule, id_key, key_id

__all__ = ["DiskStorage", "SyncMode"]

log = logging.getLogger(__name__)

#: How a DiskStorage makes its files durable; see the module documentation.
SyncMode = Literal["auto", "fsync", "syncfs", "none"]

_ENV_SUFFIX = ".env"
_META_SUFFIX = ".meta"
# Scratch files: <token>.<counter>.tmp, where the token is random per storage object, so that
# load() can tell its own files from a dead process's leftovers.
_SCRATCH = re.compile(r"[0-9a-f]{8}\.[0-9a-f]+\.tmp")
_POOL_SIZE = 1024  # files taken out of the queue, kept for reuse
_RENAME_EXCHANGE = 2
_META_MAGIC = b"smtpq-meta"
_META_VERSION = 1
_META_HEADER = re.compile(rb"smtpq-meta (\d+) ([0-9a-f]{8})")
# At most this many fsyncs of a batch are made one after the other in the commit thread; more
# go to the sync pool in parallel.
_INLINE_FSYNCS = 3
# Seconds a removal submitted alone waits for other operations to share its commit with.
_REMOVE_LINGER = 0.005
# In "auto" mode, a batch with more new files than this may be flushed by one syncfs.
_SYNCFS_FROM = 16
_META_NAME = re.compile(r"[0-9a-f]{32}\.meta")
_ENV_NAME = re.compile(r"[0-9a-f]{32}\.env")
# Enough for the frame header and the metadata of nearly every envelope in one read.
_HEAD_READ = 4096
_MAX_BATCH = 512
_EXPLORE_EVERY = 16  # batches between tries of the way that has been dearer lately
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_REUSE_FILE = os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# Reading must not write: without O_NOATIME, the first read of each file after it was written
# updates its atime (relatime), and a load of a million messages would write back a million
# inodes. Only the files' owner may use it; others fall back to plain reads.
_READ_NOATIME = _READ_FILE | getattr(os, "O_NOATIME", 0)
# load() reads the meta files in one thread, and asks the kernel for each file this many files
# before it reads it (POSIX_FADV_WILLNEED starts the read and does not wait): on a cold page
# cache the disk serves that many reads at once, where one read after another would wait for
# each, and threads reading at once would take turns at the interpreter lock around every open,
# read and close. On the benchmark machine, a load of a million messages whose files were not
# in the page cache took 22 s so, 43 s in eight threads, and 54 s in one thread without reading
# ahead (bench/RESULTS.md, "Scale (issue 7)").
_SCAN_AHEAD = 64
_INFO_AHEAD = 32  # the same for a listing (two files per message)


class _CorruptError(Exception):
    """A stored file cannot be trusted (truncated, unparseable, wrong version, inconsistent)."""


@dataclass(slots=True)
class _Meta:
    """The mutable part of a message, as stored in its ``.meta`` file."""

    timestamp: float
    attempts: int = 0
    delivered: list[int] = field(default_factory=list)
    held: bool = False
    last_reply: ReplyDict | None = None


def _encode_meta(meta: _Meta) -> bytes:
    body = json.dumps(
        {
            "timestamp": meta.timestamp,
            "attempts": meta.attempts,
            "delivered": meta.delivered,
            "held": meta.held,
            "last_reply": meta.last_reply,
        },
        separators=(",", ":"),
    ).encode()
    return b"%s %d %08x\n%s\n" % (_META_MAGIC, _META_VERSION, zlib.crc32(body), body)


def _decode_meta(data: bytes) -> _Meta:
    head, sep, rest = data.partition(b"\n")
    match = _META_HEADER.fullmatch(head)
    if not sep or match is None:
        raise _CorruptError("not an smtpq meta file (bad header)")
    if int(match[1]) != _META_VERSION:
        raise _CorruptError(f"unsupported meta format version {int(match[1])}")
    if not rest.endswith(b"\n"):
        raise _CorruptError("meta file truncated")
    body = rest[:-1]
    if zlib.crc32(body) != int(match[2], 16):
        raise _CorruptError("meta checksum mismatch")
    try:
        obj = json.loads(body)
        ts, attempts, delivered = obj["timestamp"], obj["attempts"], obj["delivered"]
        held, reply = obj["held"], obj["last_reply"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _CorruptError(f"meta unreadable: {exc}") from exc
    if (
        not isinstance(ts, int | float)
        or isinstance(ts, bool)
        or not math.isfinite(ts)
        or type(attempts) is not int
        or attempts < 0
        or not isinstance(delivered, list)
        or not all(type(i) is int and i >= 0 for i in delivered)
        or type(held) is not bool
        or not (
            reply is None
            or (
                isinstance(reply, dict)
                and all(isinstance(v, str | bool | None) for v in reply.values())
            )
        )
    ):
        raise _CorruptError("meta has wrong field types")
    return _Meta(float(ts), attempts, delivered, held, reply)


# What load() needs of a meta file, where it is laid out as _encode_meta writes it: one regex
# finds the next attempt time and the held flag once the checksum is verified, instead of
# parsing and checking the whole document (a third of the CPU time of that). Any other layout
# goes through _decode_meta; the types inside last_reply are checked when the message is read.
_SCHEDULE_FIELDS = re.compile(
    rb'smtpq-meta 1 ([0-9a-f]{8})\n(\{"timestamp":(-?[0-9][0-9.eE+-]*),"attempts":[0-9]+,'
    rb'"delivered":\[[0-9,]*\],"held":(true|false),"last_reply":(?:null|\{.*\})\})\n',
    re.DOTALL,
)


def _schedule_fields(data: bytes) -> tuple[float, bool]:
    """A meta file's next attempt time and held flag; _CorruptError as _decode_meta raises."""
    match = _SCHEDULE_FIELDS.fullmatch(data)
    if match is not None and zlib.crc32(match[2]) == int(match[1], 16):
        with contextlib.suppress(ValueError):
            timestamp = float(match[3])
            if math.isfinite(timestamp):
                return timestamp, match[4] == b"true"
    meta = _decode_meta(data)
    return meta.timestamp, meta.held


def _opened(id: str, fd: int | OSError) -> int:
    """The fd of a file opened ahead; or what opening it raised (MessageGone if it was gone)."""
    if isinstance(fd, FileNotFoundError):
        raise MessageGone(id)
    if isinstance(fd, OSError):
        raise fd
    return fd


def _read_all(fd: int) -> bytes:
    """The whole of an open file (a meta file is one read)."""
    data = os.read(fd, 65536)
    if len(data) == 65536:
        chunks = [data]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        data = b"".join(chunks)
    return data


def _check_id(id: object) -> str:
    """The id if it has this storage's form; MessageGone otherwise (it names no stored file)."""
    if not isinstance(id, str) or not is_valid_id(id):
        raise MessageGone(str(id))
    return id


def _libc_function(name: str) -> Any:
    """A function of the C library (called without the GIL), or None where there is none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _syncfs_function() -> Callable[[int], None] | None:
    """syncfs(2) where it reports writeback errors (Linux 5.8 and later), else None."""
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    if sys.platform != "linux" or not release or (int(release[1]), int(release[2])) < (5, 8):
        return None
    func = _libc_function("syncfs")
    if func is None:
        return None

    def syncfs(fd: int) -> None:
        if func(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs


# -- operations carried by a commit batch ------------------------------------------------------

_WRITE, _UPDATE, _REMOVE, _QUARANTINE = "write", "update", "remove", "quarantine"


class _Op:
    """One storage operation waiting in, or carried by, a commit batch."""

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
        kind: str,
        id: str,
        future: asyncio.Future[Any],
        *,
        env: bytes | None = None,
        meta: _Meta | None = None,
        fn: Callable[[_Meta], Any] | None = None,
        effect: str | None = None,
        claimed: bool = False,
    ) -> None:
        self.kind = kind
        self.id = id
        self.future = future
        self.env = env
        self.meta = meta  # the new meta (write), or the meta after the update (update)
        self.fn = fn
        self.effect = effect  # what an update does to the schedule: "reschedule", "hold"
        self.claimed = claimed
        self.result: Any = None
        self.error: BaseException | None = None


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
        self.ops: list[_Op] = []
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


class _FlushChooser:
    """For ``sync="auto"``: per batch, the cheaper way to make its new files durable.

    A few files are fsynced (a lone write must not wait for other programs' dirty data). For
    more, one syncfs usually costs far less than their fsyncs, unless the filesystem holds much
    of other programs' dirty data, which syncfs must write too. So both are timed, on batches
    of more than :data:`_SYNCFS_FROM` files, and the one that cost less lately is used, the
    other tried now and then to follow changes.
    """

    __slots__ = ("_fsync_per_file", "_syncfs", "_turn")

    def __init__(self) -> None:
        self._fsync_per_file: float | None = None  # seconds, moving averages
        self._syncfs: float | None = None
        self._turn = 0

    def use_syncfs(self, files: int) -> bool:
        """Whether to flush a batch of ``files`` new files with one syncfs."""
        if files <= _SYNCFS_FROM:
            return False
        if self._syncfs is None or self._fsync_per_file is None:
            return self._syncfs is None  # try each once
        self._turn += 1
        cheaper = self._syncfs < self._fsync_per_file * files
        return cheaper != (self._turn % _EXPLORE_EVERY == 0)

    def record(self, syncfs: bool, files: int, seconds: float) -> None:
        """What flushing a batch cost."""
        if files <= _SYNCFS_FROM:
            return
        if syncfs:
            self._syncfs = _average(self._syncfs, seconds)
        else:
            self._fsync_per_file = _average(self._fsync_per_file, seconds / files)


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.7 * old + 0.3 * new


def _queue_error(what: str, exc: OSError) -> QueueError:
    error = QueueError(f"{what}: {exc.strerror or exc}")
    error.__cause__ = exc
    return error


class DiskStorage(LocallyScheduled):
    """A durable queue in two directories of small files; see the module documentation.

    :param env_dir: directory of the envelope files (created ``0700`` if missing).
    :param meta_dir: directory of the meta files.
    :param tmp_dir: scratch directory; default ``meta_dir/tmp``. It must be on the same
        filesystem as the other directories, so that renames are atomic.
    :param corrupt_dir: where bad entries are moved; default ``meta_dir/corrupt``.
    :param sync: ``"auto"`` (default: fsync for small batches, syncfs for large ones where the
        kernel reports syncfs errors, Linux 5.8 and later), ``"fsync"``, ``"syncfs"``, or
        ``"none"`` (unsafe: no durability against power loss; for tests and benchmarks).
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
        sync: SyncMode = "auto",
        lease_timeout: float = 60.0,
        threads: int = 8,
    ) -> None:
        if sync not in ("auto", "fsync", "syncfs", "none"):
            raise ValueError(f"sync must be 'auto', 'fsync', 'syncfs' or 'none', not {sync!r}")
        syncfs = _syncfs_function() if sync in ("auto", "syncfs") else None
        if sync == "syncfs" and syncfs is None:
            raise ValueError("sync='syncfs' needs Linux 5.8 or later")
        if sync == "auto" and syncfs is None:
            sync = "fsync"
        self.env_dir = os.path.abspath(env_dir)
        self.meta_dir = os.path.abspath(meta_dir)
        self.tmp_dir = os.path.abspath(tmp_dir or os.path.join(self.meta_dir, "tmp"))
        self.corrupt_dir = os.path.abspath(corrupt_dir or os.path.join(self.meta_dir, "corrupt"))
        #: The durability in force (``"auto"`` only where syncfs is usable).
        self.sync: SyncMode = sync
        # At most this many operations in a batch: in fsync mode each new file is an open fd.
        self._max_batch = 128 if sync == "fsync" else 512
        self._batch_syncfs = False  # how the current batch is flushed (commit thread only)
        self._chooser = _FlushChooser()
        self.lease_timeout = lease_timeout
        self._syncfs = syncfs
        self._renameat2 = _libc_function("renameat2")
        self._schedule = LocalSchedule()
        self._loaded = False
        self._load_lock = asyncio.Lock()
        # While load() scans, the outcome of every change made meanwhile, so that the rebuilt
        # schedule keeps it: id -> (timestamp, held), or None when removed.
        self._touched: dict[str, tuple[float, bool] | None] | None = None
        # Ids with a write or remove in flight; read by the scan thread (dict reads are atomic).
        self._inflight: Counter[str] = Counter()
        self._pending: list[_Op] = []
        self._committer: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None  # removals waiting for company
        self._closed = False
        # The commit thread runs batches one at a time; the sync pool fsyncs the files of one
        # batch in parallel; the I/O pool serves reads and load().
        self._commit_pool = ThreadPoolExecutor(1, thread_name_prefix="smtpq-disk-commit")
        self._sync_pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="smtpq-disk-sync")
        self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="smtpq-disk-io")
        self._read_flags = _READ_NOATIME
        self._token = secrets.token_hex(4)
        self._scratch_seq = 0
        self._scratch_lock = threading.Lock()
        self._pool: list[str] = []
        self._pool_lock = threading.Lock()
        self._dirs_lock = threading.Lock()
        self._dfd: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._corrupt = 0
        self._corrupt_stored = 0
        self._orphans_removed = 0
        self._scratch_removed = 0
        self._batches = 0
        self._batched_ops = 0

    # -- directories (worker threads only) ---------------------------------------------------

    def _dirs(self) -> dict[str, int]:
        """Open (creating if missing) the four directories once; their fds, by role."""
        if self._dfd:
            return self._dfd
        with self._dirs_lock:
            if self._dfd:
                return self._dfd
            paths = {
                "env": self.env_dir,
                "meta": self.meta_dir,
                "tmp": self.tmp_dir,
                "corrupt": self.corrupt_dir,
            }
            fds: dict[str, int] = {}
            try:
                for role, path in paths.items():
                    self._make_dir(path)
                    fds[role] = os.open(path, _DIR_FLAGS)
                devices = {os.fstat(fd).st_dev for fd in fds.values()}
                if len(devices) != 1:
                    raise QueueError(
                        "env_dir, meta_dir, tmp_dir and corrupt_dir must be on one filesystem"
                    )
            except BaseException:
                for fd in fds.values():
                    os.close(fd)
                raise
            self._dfd = fds
            return fds

    def _make_dir(self, path: str) -> None:
        """Create a missing directory (and parents) ``0700``, durably: a queue directory that
        a crash could take away would take acknowledged mail with it."""
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        self._make_dir(parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask
        if self.sync != "none":
            fd = os.open(parent, _DIR_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _fsync_dir(self, role: str) -> None:
        if self.sync != "none":
            os.fsync(self._dfd[role])

    def _scratch_name(self) -> str:
        with self._scratch_lock:
            self._scratch_seq += 1
            return f"{self._token}.{self._scratch_seq:x}.tmp"

    def _scratch(self, data: bytes, unit: _Unit) -> str:
        """A scratch file holding ``data``; its name in tmp_dir.

        Unless the batch is flushed by syncfs, its fd is left open in ``unit.fds``, to be
        fsynced with the rest of the batch in parallel.

        A recycled inode is used when there is one: on ext4 without a journal, creating files
        where many were deleted recently is slow (the allocator skips recently freed inodes).
        """
        tmp = self._dfd["tmp"]
        fd = -1
        with self._pool_lock:
            name = self._pool.pop() if self._pool else None
        if name is not None:
            try:
                fd = os.open(name, _REUSE_FILE, dir_fd=tmp)  # a planted symlink: ELOOP
            except OSError:
                self._unlink(name, "tmp")
        if fd < 0:
            name = self._scratch_name()
            fd = os.open(name, _NEW_FILE, 0o600, dir_fd=tmp)
        assert name is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # Overwritten in place, cut to size: shrinking within a block frees nothing (on a
            # filesystem mounted with "discard", every freed block costs a TRIM).
            os.ftruncate(fd, len(data))
        except BaseException:
            os.close(fd)
            self._unlink(name, "tmp")
            raise
        if self.sync == "none" or self._batch_syncfs:
            os.close(fd)
        else:
            unit.fds.append(fd)
        return name

    def _flush_new_files(self, live: list[_Unit], writes: list[_Unit]) -> None:
        """Flush wave 1: every new file, and the new envelopes' names in env_dir, durable.

        Either one syncfs, or the files and env_dir fsynced in parallel threads (the device
        merges their flushes). Units whose files could not be made durable fail, and nothing
        of them is left behind.
        """
        if self.sync == "none":
            return
        failed: list[tuple[list[_Unit], OSError]] = []
        if self._batch_syncfs:
            assert self._syncfs is not None
            if not writes and not any(u.meta_scratch for u in live):
                return
            try:
                self._syncfs(self._dfd["tmp"])
            except OSError as exc:
                failed.append((live, exc))
        else:
            jobs: list[tuple[_Unit | None, int]] = [(u, fd) for u in live for fd in u.fds]
            if writes:
                jobs.append((None, self._dfd["env"]))

            def sync(fd: int) -> OSError | None:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    return exc
                return None

            # A lone write (two files and env_dir) is flushed here, in order: handing three
            # fsyncs to the pool cost more CPU (thread wake-ups, GIL hand-offs) than their
            # overlap saved (bench/RESULTS.md, 1 session).
            if len(jobs) > _INLINE_FSYNCS:
                errors = list(self._sync_pool.map(sync, [fd for _, fd in jobs]))
            else:
                errors = [sync(fd) for _, fd in jobs]
            for unit in live:
                self._close_files(unit)
            for (owner, _), error in zip(jobs, errors, strict=True):
                if error is not None:  # env_dir's failure is every new envelope's
                    failed.append((writes if owner is None else [owner], error))
        for units, problem in failed:
            for unit in units:
                if not unit.ok:
                    continue
                if unit.write:
                    self._undo_write(unit, problem)
                elif unit.meta_scratch is not None:
                    unit.fail(_queue_error("cannot update message", problem))
                    self._drop_scratch(unit)

    def _close_files(self, unit: _Unit) -> None:
        for fd in unit.fds:
            os.close(fd)
        unit.fds.clear()

    def _recycle(self, names: list[str]) -> None:
        """Keep files moved out of the queue (inodes and blocks) for new scratch files."""
        with self._pool_lock:
            room = max(0, _POOL_SIZE - len(self._pool))
            self._pool.extend(names[:room])
        for name in names[room:]:
            self._unlink(name, "tmp")

    def _move_out(self, name: str, role: str) -> str | None:
        """Move a queue file into tmp_dir (to be recycled); its new name, None if it was gone."""
        target = self._scratch_name()
        try:
            os.rename(name, target, src_dir_fd=self._dfd[role], dst_dir_fd=self._dfd["tmp"])
        except FileNotFoundError:
            return None
        return target

    def _replace_meta(self, scratch: str, id: str) -> bool:
        """Atomically put a scratch file in place of a meta file.

        True when the two were exchanged (RENAME_EXCHANGE), so that ``scratch`` now names the
        old meta's inode, for recycling; False when it was a plain rename.
        """
        tmp, meta = self._dfd["tmp"], self._dfd["meta"]
        name = id + _META_SUFFIX
        if self._renameat2 is not None:
            if self._renameat2(tmp, scratch.encode(), meta, name.encode(), _RENAME_EXCHANGE) == 0:
                return True
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(err, os.strerror(err))
            self._renameat2 = None  # this filesystem cannot exchange: plain renames from now on
        os.rename(scratch, name, src_dir_fd=tmp, dst_dir_fd=meta)
        return False

    def _unlink(self, name: str, role: str) -> bool:
        """Unlink if present; True when something was removed."""
        try:
            os.unlink(name, dir_fd=self._dfd[role])
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot remove %s/%s: %s", role, name, exc)
            return False
        return True

    def _open_read(self, name: str, dir_fd: int) -> int:
        try:
            return os.open(name, self._read_flags, dir_fd=dir_fd)
        except PermissionError:
            if self._read_flags == _READ_FILE:
                raise
            self._read_flags = _READ_FILE  # not the files' owner: no O_NOATIME
            return os.open(name, _READ_FILE, dir_fd=dir_fd)

    def _read(self, name: str, role: str) -> bytes:
        fd = self._open_read(name, self._dfd[role])
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def _read_meta(self, id: str) -> _Meta:
        """The meta of a stored message: MessageGone if it does not exist, _CorruptError if bad."""
        try:
            data = self._read(id + _META_SUFFIX, "meta")
            os.stat(id + _ENV_SUFFIX, dir_fd=self._dfd["env"], follow_symlinks=False)
        except FileNotFoundError:
            raise MessageGone(id) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):
                raise _CorruptError(str(exc)) from exc
            raise
        return _decode_meta(data)

    def _quarantine(self, id: str, reason: str) -> bool:
        """Move an entry's files (meta first) to the corrupt directory; True if any moved."""
        moved = False
        for suffix, role in ((_META_SUFFIX, "meta"), (_ENV_SUFFIX, "env")):
            name = id + suffix
            target, n = name, 0
            while os.path.lexists(os.path.join(self.corrupt_dir, target)):
                n += 1
                target = f"{name}.{n}"
            try:
                os.rename(name, target, src_dir_fd=self._dfd[role], dst_dir_fd=self._dfd["corrupt"])
            except FileNotFoundError:
                continue
            moved = True
        if moved:
            log.error("queue entry %s is corrupt (%s): moved to %s", id, reason, self.corrupt_dir)
            with self._stats_lock:
                self._corrupt += 1
                self._corrupt_stored += 1
        return moved

    # -- the commit batch (commit thread) ------------------------------------------------------

    def _prepare(self, unit: _Unit) -> None:
        """Write the scratch files of one message (durable only after the first flush)."""
        try:
            if unit.write:
                op = unit.ops[0]
                assert op.env is not None
                assert op.meta is not None
                unit.env_scratch = self._scratch(op.env, unit)
                unit.meta_scratch = self._scratch(_encode_meta(op.meta), unit)
                return
            if unit.quarantine:
                for op in unit.ops:
                    if op.kind != _QUARANTINE:
                        op.error = MessageGone(unit.id)
                return
            meta: _Meta | None = None
            original = b""
            for op in unit.ops:
                if op.kind == _REMOVE:
                    unit.remove = True  # idempotent: a second removal is no error
                elif unit.remove:
                    op.error = MessageGone(unit.id)
                else:
                    assert op.fn is not None
                    if meta is None:
                        meta = self._read_meta(unit.id)
                        original = _encode_meta(meta)
                    op.result = op.fn(meta)
                    op.meta = _Meta(meta.timestamp, meta.attempts, [], meta.held)
            if unit.remove or meta is None:
                return
            data = _encode_meta(meta)
            if data != original:  # an idempotent change needs no write
                unit.meta_scratch = self._scratch(data, unit)
        except MessageGone as exc:
            unit.fail(exc)
        except _CorruptError as exc:
            unit.fail(MessageGone(unit.id))
            self._quarantine(unit.id, str(exc))
            unit.quarantine = True
        except OSError as exc:
            what = "cannot store message" if unit.write else "cannot update message"
            unit.fail(_queue_error(what, exc))
            self._drop_scratch(unit)
        except Exception as exc:  # a bug must fail its operations, not the commit thread
            log.exception("queue operation on %s failed", unit.id)
            unit.fail(QueueError(f"queue storage failure: {exc!r}"))
            self._drop_scratch(unit)

    def _drop_scratch(self, unit: _Unit) -> None:
        self._close_files(unit)
        for name in (unit.env_scratch, unit.meta_scratch):
            if name is not None:
                self._unlink(name, "tmp")
        unit.env_scratch = unit.meta_scratch = None

    def _undo_write(self, unit: _Unit, exc: OSError) -> None:
        """Take back a write that cannot be made durable: nothing half-written stays."""
        unit.fail(_queue_error("cannot store message", exc))
        self._unlink(unit.id + _META_SUFFIX, "meta")
        self._unlink(unit.id + _ENV_SUFFIX, "env")
        self._drop_scratch(unit)

    def _commit(self, ops: list[_Op]) -> None:
        """Carry out one batch; each op gets its result or its error."""
        try:
            self._dirs()
        except QueueError as exc:
            for op in ops:
                op.error = exc
            return
        except OSError as exc:
            for op in ops:
                op.error = _queue_error("queue directories unusable", exc)
            return
        units: dict[str, _Unit] = {}
        for op in ops:
            unit = units.get(op.id)
            if unit is None:
                unit = units[op.id] = _Unit(op.id)
            unit.ops.append(op)
            unit.write = unit.write or op.kind == _WRITE
            unit.quarantine = unit.quarantine or op.kind == _QUARANTINE
        # The Python work of a batch runs here, in one thread: spread over threads it would
        # only contend for the GIL. Only the fsyncs, which wait on the device, run in parallel.
        new_files = sum(2 if op.kind == _WRITE else op.kind == _UPDATE for op in ops)
        self._batch_syncfs = self.sync == "syncfs" or (
            self.sync == "auto" and self._chooser.use_syncfs(new_files)
        )
        todo = list(units.values())
        for unit in todo:
            self._prepare(unit)
        live = [u for u in todo if u.ok]
        # New envelopes go into place before they are durable: until its meta appears an
        # envelope is not a message, and the meta appears only after the first flush wave.
        writes, meta_changed = self._envelopes_in_metas_out(live)
        started = time.monotonic()
        self._flush_new_files(live, writes)
        self._chooser.record(self._batch_syncfs, new_files, time.monotonic() - started)
        live = [u for u in live if u.ok]
        meta_changed = self._metas_in(live) or meta_changed
        # Flush wave 2: the batch is durable.
        if meta_changed:
            try:
                self._fsync_dir("meta")
                if any(u.quarantine for u in live):
                    self._fsync_dir("corrupt")
            except OSError as exc:
                for unit in live:
                    if not unit.ok:
                        continue
                    if unit.write:
                        self._undo_write(unit, exc)
                    else:
                        unit.fail(_queue_error("cannot flush queue files", exc))
        # Last, the envelopes of removed messages. Not fsynced: after a crash an envelope
        # without its meta is an orphan, which load() deletes.
        old: list[str] = []
        for unit in live:
            if unit.remove and unit.ok:
                name = self._move_out(unit.id + _ENV_SUFFIX, "env")
                if name is not None:
                    old.append(name)
            # After a failed flush, the old meta may be what a crash brings back: keep it
            # as it is (a later load deletes it).
            if unit.old_meta is not None and unit.ok:
                old.append(unit.old_meta)
        self._recycle(old)
        failed = [op for op in ops if isinstance(op.error, QueueError)]
        if failed:
            log.error("%d queue operation(s) failed: %s", len(failed), failed[0].error)

    def _envelopes_in_metas_out(self, live: list[_Unit]) -> tuple[list[_Unit], bool]:
        """New envelopes into place; metas of removed messages out (durable with the last
        flush, before their envelopes go). The units that wrote, and whether meta_dir changed.
        """
        writes: list[_Unit] = []
        meta_changed = False
        for unit in live:
            if unit.quarantine:
                if any(op.kind == _QUARANTINE for op in unit.ops):
                    self._quarantine(unit.id, "envelope unreadable")
                    meta_changed = True
            elif unit.write:
                assert unit.env_scratch is not None
                try:
                    os.rename(
                        unit.env_scratch,
                        unit.id + _ENV_SUFFIX,
                        src_dir_fd=self._dfd["tmp"],
                        dst_dir_fd=self._dfd["env"],
                    )
                except OSError as exc:
                    self._undo_write(unit, exc)
                    continue
                unit.env_scratch = None
                writes.append(unit)
            elif unit.remove:
                try:
                    unit.old_meta = self._move_out(unit.id + _META_SUFFIX, "meta")
                    meta_changed = meta_changed or unit.old_meta is not None
                except OSError as exc:
                    unit.fail(_queue_error("cannot remove message", exc))
        return writes, meta_changed

    def _metas_in(self, live: list[_Unit]) -> bool:
        """New and updated metas into place; True when meta_dir changed."""
        changed = False
        for unit in live:
            if unit.meta_scratch is None or not unit.ok:
                continue
            try:
                if unit.write:
                    os.rename(
                        unit.meta_scratch,
                        unit.id + _META_SUFFIX,
                        src_dir_fd=self._dfd["tmp"],
                        dst_dir_fd=self._dfd["meta"],
                    )
                elif self._replace_meta(unit.meta_scratch, unit.id):
                    unit.old_meta = unit.meta_scratch
            except OSError as exc:
                if unit.write:
                    self._undo_write(unit, exc)
                else:
                    unit.fail(_queue_error("cannot update message", exc))
                    self._drop_scratch(unit)
                continue
            unit.meta_scratch = None
            changed = True
        return changed

    # -- the commit batch (event loop) ---------------------------------------------------------

    async def _submit(self, op: _Op) -> Any:
        if self._closed:
            raise QueueError("the queue storage is closed")
        if op.kind in (_WRITE, _REMOVE):
            self._inflight[op.id] += 1
        self._pending.append(op)
        if self._committer is None:
            if op.kind != _REMOVE:
                self._start_committer()
            elif self._linger is None:
                # Nobody but the finished attempt waits for a removal: it waits a little for
                # company, so that at low load the next message's write carries it.
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(_REMOVE_LINGER, self._start_committer)
        # Shielded: a cancelled caller must not cancel the outcome the batch will deliver.
        return await asyncio.shield(op.future)

    def _start_committer(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._committer is None and self._pending:
            self._committer = asyncio.get_running_loop().create_task(self._commit_loop())

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    await loop.run_in_executor(self._commit_pool, self._commit, batch)
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
        finally:
            self._committer = None

    def _note(self, id: str, state: tuple[float, bool] | None) -> None:
        if self._touched is not None:
            self._touched[id] = state

    def _finish(self, batch: list[_Op]) -> None:
        """Apply a committed batch to the schedule and wake its callers (event loop)."""
        schedule = self._schedule
        self._batches += 1
        self._batched_ops += len(batch)
        for op in batch:
            if op.kind in (_WRITE, _REMOVE):
                self._inflight[op.id] -= 1
                if self._inflight[op.id] <= 0:
                    del self._inflight[op.id]
            if op.error is None:
                if op.kind == _WRITE:
                    assert op.meta is not None
                    lease = op.meta.timestamp + self.lease_timeout if op.claimed else None
                    schedule.add(op.id, op.meta.timestamp, lease_until=lease)
                    self._note(op.id, (op.meta.timestamp, False))
                    op.result = op.id
                elif op.kind in (_REMOVE, _QUARANTINE):
                    schedule.discard(op.id)
                    self._note(op.id, None)
                elif op.meta is not None:
                    self._apply_update(op)
            elif isinstance(op.error, MessageGone) and op.kind == _UPDATE:
                schedule.discard(op.id)  # gone, or quarantined
                self._note(op.id, None)
            if not op.future.done():
                if op.error is None:
                    op.future.set_result(op.result)
                else:
                    op.future.set_exception(op.error)

    def _apply_update(self, op: _Op) -> None:
        schedule, id, meta = self._schedule, op.id, op.meta
        assert meta is not None
        if id in schedule:
            if op.effect == "reschedule":
                schedule.reschedule(id, meta.timestamp)  # ends the lease, even at the same time
            elif op.effect == "hold":
                schedule.hold(id, meta.held)
            self._note(id, (schedule.timestamp(id), schedule.is_held(id)))
        elif self._loaded:  # stored, but written by another storage object since our load
            schedule.add(id, meta.timestamp, held=meta.held)
            self._note(id, (meta.timestamp, meta.held))

    async def _update(self, id: str, fn: Callable[[_Meta], Any], effect: str | None = None) -> Any:
        loop = asyncio.get_running_loop()
        op = _Op(_UPDATE, _check_id(id), loop.create_future(), fn=fn, effect=effect)
        return await self._submit(op)

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            async with self._load_lock:
                if not self._loaded:  # else another task loaded it while this one waited
                    await self._reload()

    # -- records -------------------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """Store a message durably; see :meth:`QueueStorage.write`.

        Raises :class:`~smtpq.errors.QueueError` (reply ``451 4.3.0``) on a full disk, a
        permission or an I/O error; nothing half-written is left behind then.
        """
        loop = asyncio.get_running_loop()
        id = new_id(timestamp)
        op = _Op(
            _WRITE,
            id,
            loop.create_future(),
            env=envelope.to_bytes(),
            meta=_Meta(float(timestamp)),
            claimed=claimed,
        )
        result: str = await self._submit(op)
        return result

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """See :meth:`QueueStorage.set_timestamp`."""
        reply = last_reply.to_dict() if last_reply is not None else None

        def change(meta: _Meta) -> None:
            meta.timestamp = float(timestamp)
            if reply is not None:
                meta.last_reply = reply

        await self._update(id, change, "reschedule")

    async def increment_attempts(self, id: str) -> int:
        """See :meth:`QueueStorage.increment_attempts`."""

        def change(meta: _Meta) -> int:
            meta.attempts += 1
            return meta.attempts

        result: int = await self._update(id, change)
        return result

    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """See :meth:`QueueStorage.set_recipients_delivered`."""
        new = {int(i) for i in indexes}

        def change(meta: _Meta) -> None:
            meta.delivered = sorted(new.union(meta.delivered))

        await self._update(id, change)

    async def load(self) -> list[tuple[float, str]]:
        """Rebuild the schedule from the meta files; see :meth:`QueueStorage.load`.

        Never stops at a bad entry: truncated, unparseable, wrong-version or inconsistent files
        go to the corrupt directory (logged, counted in :meth:`get_info`); this storage's
        scratch leftovers are deleted; orphans are resolved (see the module documentation).
        The scan runs in a worker thread (reading the meta files ahead, many at once); writes
        and removals may go on meanwhile. The other methods load on first use, without building
        this list.
        """
        async with self._load_lock:
            await self._reload()
        return self._schedule.entries()

    async def _reload(self) -> None:
        """Scan the directories and rebuild the schedule (under the load lock)."""
        loop = asyncio.get_running_loop()
        self._touched = {}
        try:
            found, held = await loop.run_in_executor(self._io_pool, self._scan)
            touched = self._touched
        finally:
            self._touched = None
        for id, state in touched.items():
            key = id_key(id)
            if state is None:
                found.pop(key, None)
                held.discard(key)
            else:
                found[key] = state[0]
                if state[1]:
                    held.add(key)
                else:
                    held.discard(key)
        # Keep the leases this object holds: a reload must not hand an attempt to a second
        # worker.
        self._schedule.rebuild(found, held, self._schedule.leases())
        self._loaded = True

    def _scan(self) -> tuple[dict[int, float], set[int]]:
        """load()'s work, in one worker thread: next attempt times and held messages, by key
        (:func:`~smtpq.storage.schedule.id_key`: compact, as the schedule keeps them)."""
        try:
            self._dirs()
        except OSError as exc:
            raise _queue_error("queue directories unusable", exc) from exc
        started = time.monotonic()
        scratch = orphans = 0
        own = f"{self._token}."
        with os.scandir(self.tmp_dir) as it:
            for entry in it:
                name = entry.name
                if (
                    _SCRATCH.fullmatch(name)
                    and not name.startswith(own)
                    and self._unlink(name, "tmp")
                ):
                    scratch += 1

        corrupt_before = self._corrupt
        found: dict[int, float] = {}
        held: set[int] = set()
        keys: list[int] = []
        is_meta = _META_NAME.fullmatch
        with os.scandir(self.meta_dir) as it:
            for entry in it:
                name = entry.name
                if is_meta(name):
                    keys.append(int(name[:32], 16))
        self._read_metas(keys, found, held)  # the keys go on to be the schedule's own
        del keys

        # Every message needs its envelope. A directory listing names each file that stays
        # put exactly once, so counting the envelopes of found messages tells whether one is
        # missing, without a set of a million names; only then are they looked for.
        matched = 0
        is_env = _ENV_NAME.fullmatch
        with os.scandir(self.env_dir) as it:
            for entry in it:
                name = entry.name
                if not is_env(name):
                    continue
                if int(name[:32], 16) in found:
                    matched += 1
                # An envelope whose meta never appeared (a write cut short) or is gone (a
                # removal cut short) is not a message.
                elif (
                    name[:32] not in self._inflight
                    and not self._exists(name[:32] + _META_SUFFIX, "meta")
                    and self._unlink(name, "env")
                ):
                    orphans += 1
        if matched != len(found):
            envs = self._env_keys()
            for key in [k for k in found if k not in envs]:
                id = key_id(key)
                if id in self._inflight or self._exists(id + _ENV_SUFFIX, "env"):
                    continue
                del found[key]
                held.discard(key)
                if self._exists(id + _META_SUFFIX, "meta"):
                    self._quarantine(id, "envelope file missing")
            del envs
        if self._corrupt != corrupt_before:
            self._fsync_dir("meta")
            self._fsync_dir("corrupt")
        stored = self._count_corrupt()
        with self._stats_lock:
            self._orphans_removed += orphans
            self._scratch_removed += scratch
            self._corrupt_stored = stored
        log.info(
            "loaded %d queued messages in %.1f s (%d corrupt, %d orphans and %d scratch files"
            " removed)",
            len(found),
            time.monotonic() - started,
            self._corrupt - corrupt_before,
            orphans,
            scratch,
        )
        return found, held

    def _read_metas(self, keys: list[int], found: dict[int, float], held: set[int]) -> None:
        """Read the meta files of ``keys`` into ``found`` and ``held``, each file asked for
        _SCAN_AHEAD files before it is read (see there)."""
        ahead: deque[tuple[int, int]] = deque()  # (key, fd): opened, read asked for
        try:
            for key in keys:
                if self._closed:  # closing: a load of a million files need not run to its end
                    raise QueueError("the queue storage is closed")
                fd = self._open_ahead(f"{key:032x}{_META_SUFFIX}", "meta", 0)
                if isinstance(fd, OSError):
                    self._unreadable_meta(key, fd)
                    continue
                ahead.append((key, fd))
                if len(ahead) > _SCAN_AHEAD:
                    key, fd = ahead.popleft()
                    self._read_meta_fd(key, fd, found, held)
            while ahead:
                key, fd = ahead.popleft()
                self._read_meta_fd(key, fd, found, held)
        finally:
            for _, fd in ahead:
                os.close(fd)

    def _read_meta_fd(self, key: int, fd: int, found: dict[int, float], held: set[int]) -> None:
        """Read an opened meta file (and close it) into ``found`` and ``held``."""
        try:
            try:
                data = _read_all(fd)
            finally:
                os.close(fd)
            timestamp, is_held = _schedule_fields(data)
        except _CorruptError as exc:
            self._quarantine(key_id(key), str(exc))
            return
        except OSError as exc:
            self._unreadable_meta(key, exc)
            return
        found[key] = timestamp
        if is_held:
            held.add(key)

    def _unreadable_meta(self, key: int, exc: OSError) -> None:
        """A meta file load() could not open or read: gone, not a file, or an I/O error."""
        if isinstance(exc, FileNotFoundError):
            return  # removed meanwhile
        id = key_id(key)
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            self._quarantine(id, str(exc))
        else:  # maybe transient (EIO, EMFILE): leave the files for the next load
            log.error("cannot read queue entry %s: %s", id, exc)

    def _env_keys(self) -> set[int]:
        with os.scandir(self.env_dir) as it:
            return {int(e.name[:32], 16) for e in it if _ENV_NAME.fullmatch(e.name)}

    def _meta_keys(self) -> list[int]:
        """The keys of the meta files, sorted: the stored messages, without reading them."""
        self._dirs()
        with os.scandir(self.meta_dir) as it:
            keys = [int(e.name[:32], 16) for e in it if _META_NAME.fullmatch(e.name)]
        keys.sort()
        return keys

    def _exists(self, name: str, role: str) -> bool:
        try:
            os.stat(name, dir_fd=self._dfd[role], follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _count_corrupt(self) -> int:
        ids = set()
        with os.scandir(self.corrupt_dir) as it:
            for entry in it:
                ids.add(entry.name.split(".", 1)[0])
        return len(ids)

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """See :meth:`QueueStorage.iter_ids`: from the schedule when it is loaded, else from
        the names in the meta directory (a listing need not read a million files first)."""
        if self._loaded:
            async for ids in self._schedule.pages(page):
                yield ids
            return
        loop = asyncio.get_running_loop()
        try:
            keys = await loop.run_in_executor(self._io_pool, self._meta_keys)
        except OSError as exc:
            raise _queue_error("cannot list the queue", exc) from exc
        for start in range(0, len(keys), page):
            yield [key_id(key) for key in keys[start : start + page]]

    async def get_infos(self, ids: Sequence[str]) -> list[MessageInfo]:
        """See :meth:`QueueStorage.get_infos`: one worker-thread call for all of ``ids``,
        reading each meta file and only the start of each envelope file (not the message).
        """
        wanted = [id for id in ids if isinstance(id, str) and is_valid_id(id)]
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io_pool, self._read_infos, wanted)
        except OSError as exc:
            raise _queue_error("cannot read messages", exc) from exc

    def _read_infos(self, ids: list[str]) -> list[MessageInfo]:
        """The records of ``ids``, their files asked for _INFO_AHEAD messages before they are
        read (as load() does, see _SCAN_AHEAD): a listing of messages that are not in the
        page cache waits for many reads at once, not for one after another."""
        self._dirs()
        infos: list[MessageInfo] = []
        ahead: deque[tuple[str, int | OSError, int | OSError]] = deque()
        try:
            for id in ids:
                meta = self._open_ahead(id + _META_SUFFIX, "meta", 0)
                ahead.append((id, meta, self._open_ahead(id + _ENV_SUFFIX, "env", _HEAD_READ)))
                if len(ahead) > _INFO_AHEAD:
                    self._read_info_into(infos, *ahead.popleft())
            while ahead:
                self._read_info_into(infos, *ahead.popleft())
        finally:
            for _, *fds in ahead:
                for fd in fds:
                    if isinstance(fd, int):
                        os.close(fd)
        return infos

    def _open_ahead(self, name: str, role: str, length: int) -> int | OSError:
        """Open a file and ask for its first ``length`` bytes (0: all of it) to be read in the
        background; the fd, or the error that opening it raised."""
        try:
            fd = self._open_read(name, self._dfd[role])
        except OSError as exc:
            return exc
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        return fd

    def _read_info_into(
        self, infos: list[MessageInfo], id: str, meta: int | OSError, env: int | OSError
    ) -> None:
        """Append the record of message ``id`` from its opened files (which it closes), unless
        it is gone or damaged."""
        try:
            infos.append(self._read_info(id, meta, env))
        except (MessageGone, _CorruptError, EnvelopeFormatError):
            pass  # gone, or damaged: its attempt (get_entry) quarantines it
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR):
                raise

    def _read_info(self, id: str, meta_fd: int | OSError, env_fd: int | OSError) -> MessageInfo:
        try:
            meta_in, env_in = _opened(id, meta_fd), _opened(id, env_fd)
            meta = _decode_meta(_read_all(meta_in))
            data = os.read(env_in, _HEAD_READ)
            if len(data) >= HEAD_MIN:
                need = Envelope.head_size(data)
                while len(data) < need and (chunk := os.read(env_in, need - len(data))):
                    data += chunk
        finally:
            for fd in (meta_fd, env_fd):
                if isinstance(fd, int):
                    os.close(fd)
        envelope, size = Envelope.from_head(data)
        delivered = set(meta.delivered)
        return MessageInfo(
            id=id,
            sender=envelope.sender,
            recipients=tuple(r for i, r in enumerate(envelope.recipients) if i not in delivered),
            size=size,
            arrival=envelope.timestamp,
            attempts=meta.attempts,
            timestamp=meta.timestamp,
            held=meta.held,
            last_reply=Reply.from_dict(meta.last_reply) if meta.last_reply else None,
        )

    async def get_entry(self, id: str) -> StoredMessage:
        """See :meth:`QueueStorage.get_entry`.

        An entry whose files are damaged is moved to the corrupt directory and is gone
        (:class:`~smtpq.errors.MessageGone`).
        """
        id = _check_id(id)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io_pool, self._read_entry, id)
        except OSError as exc:
            raise _queue_error("cannot read message", exc) from exc
        except _CorruptError:
            await self._submit(_Op(_QUARANTINE, id, loop.create_future()))
            raise MessageGone(id) from None

    def _read_entry(self, id: str) -> StoredMessage:
        self._dirs()
        meta = self._read_meta(id)
        try:
            data = self._read(id + _ENV_SUFFIX, "env")
        except FileNotFoundError:
            raise MessageGone(id) from None
        try:
            envelope = Envelope.from_bytes(data)
        except EnvelopeFormatError as exc:
            raise _CorruptError(str(exc)) from exc
        delivered = set(meta.delivered)
        everyone = tuple(envelope.recipients)
        pending = tuple(i for i in range(len(everyone)) if i not in delivered)
        envelope.recipients = [everyone[i] for i in pending]
        return StoredMessage(
            id=id,
            envelope=envelope,
            attempts=meta.attempts,
            timestamp=meta.timestamp,
            pending=pending,
            held=meta.held,
            last_reply=Reply.from_dict(meta.last_reply) if meta.last_reply else None,
            original_recipients=everyone,
        )

    async def remove(self, id: str) -> None:
        """See :meth:`QueueStorage.remove`; durable when it returns."""
        loop = asyncio.get_running_loop()
        await self._submit(_Op(_REMOVE, _check_id(id), loop.create_future()))

    async def get_info(self) -> dict[str, Any]:
        """``size`` (messages stored), ``held``, ``active`` (being attempted), ``oldest``, and
        what an administrator wants to know about the disk:

        ``corrupt``: entries this object moved to the corrupt directory; ``corrupt_stored``:
        entries in that directory; ``orphans_removed`` and ``scratch_removed``: leftovers of
        interrupted operations deleted by ``load()``; ``batches`` and ``batched_ops``: commit
        batches run and the operations they carried (their ratio is the group-commit factor).
        """
        await self._ensure_loaded()
        with self._stats_lock:
            return {
                "size": len(self._schedule),
                **self._schedule.stats(),
                "corrupt": self._corrupt,
                "corrupt_stored": self._corrupt_stored,
                "orphans_removed": self._orphans_removed,
                "scratch_removed": self._scratch_removed,
                "batches": self._batches,
                "batched_ops": self._batched_ops,
            }

    async def close(self) -> None:
        """Finish the operations under way, then stop the worker threads."""
        self._closed = True
        async with self._load_lock:
            self._start_committer()  # removals still waiting for company go now
            if self._committer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._committer)
            await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        # Waits for reads still running before their directory fds are closed.
        for pool in (self._commit_pool, self._sync_pool, self._io_pool):
            pool.shutdown(wait=True)
        names, self._pool = self._pool, []
        for name in names:
            self._unlink(name, "tmp")
        fds, self._dfd = self._dfd, {}
        for fd in fds.values():
            os.close(fd)

    # -- schedule ------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int) -> list[str]:
        """See :meth:`QueueStorage.claim`. The files of several messages claimed at once are
        asked for at once, in the background (see _SCAN_AHEAD): messages that fall due after
        days in a big queue are not in the page cache, and their attempts, each reading its
        message in turn, would otherwise wait for one disk read after another."""
        ids = await super().claim(now, limit)
        if len(ids) > 1 and not self._closed:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: closing
                self._io_pool.submit(self._ask_ahead, ids)
        return ids

    def _ask_ahead(self, ids: list[str]) -> None:
        """Ask for the files of messages ``ids`` to be read into the page cache (I/O pool)."""
        try:
            self._dirs()
            for id in ids:
                for name, role in ((id + _META_SUFFIX, "meta"), (id + _ENV_SUFFIX, "env")):
                    fd = self._open_ahead(name, role, 0)
                    if isinstance(fd, int):
                        os.close(fd)
        except Exception:  # only a hint: the attempts read the files and report what fails
            log.debug("reading ahead failed", exc_info=True)

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

        def change(meta: _Meta) -> None:
            meta.held = held

        await self._update(id, change, "hold")
