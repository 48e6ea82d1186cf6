"""How a disk queue makes new files durable: the sync modes and the first flush of a batch.

* ``"fsync"``: each new file is fdatasynced and env_dir fsynced, in parallel threads (the
  device merges the flushes of concurrent syncs), before a meta names the files.
* ``"syncfs"``: one ``syncfs(2)`` per batch makes its new files durable. This flushes everything
  dirty on the filesystem, other programs' data included, so a spool that shares its
  filesystem with a heavy writer waits for that writer's data too. Only since Linux 5.8 does
  syncfs report write-back errors, hence the version check.
* ``"auto"`` (default): per batch of two new files or more, one syncfs — a lone write's too:
  one device flush where fsyncs need three — unless it has cost much more than the fsyncs
  lately for batches of about that size, as when other programs keep much dirty data on the
  same filesystem (:class:`FlushChooser`); a batch of one new file (a meta update) is
  fsynced; ``"fsync"`` where syncfs is not usable.
* ``"none"``: **unsafe** — no fsync at all. Renames stay atomic, so a killed process loses
  nothing, but a power failure or kernel crash can lose or empty messages that were
  acknowledged. For tests and benchmarks only.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

from smtpq.storage.disk.libc import syncfs_function

__all__ = [
    "EXPLORE_EVERY",
    "RECHECK_EVERY",
    "SAMPLES",
    "SYNCFS_TOLERANCE",
    "FlushChooser",
    "Flusher",
    "SyncMode",
    "resolve_sync_mode",
]

#: Flushes of each way and size class whose median cost is compared.
SAMPLES = 5
#: syncfs is used while it costs less than this many times the fsyncs (see FlushChooser).
SYNCFS_TOLERANCE = 2.0
#: While the fsyncs are used for batches of a size, one such batch in this many tries syncfs.
EXPLORE_EVERY = 16
#: While syncfs is used, one batch in this many tries the fsyncs (syncfs's own timings already
#: show when it gets dearer: only a stale estimate of the fsyncs needs refreshing).
RECHECK_EVERY = 256


class SyncMode(StrEnum):
    """How a DiskStorage makes its files durable; see the module documentation."""

    AUTO = "auto"
    FSYNC = "fsync"
    SYNCFS = "syncfs"
    NONE = "none"


def resolve_sync_mode(mode: SyncMode | str) -> tuple[SyncMode, Callable[[int], None] | None]:
    """The mode in force for a requested one, and the syncfs it may use.

    ``"auto"`` becomes ``"fsync"`` where syncfs is not usable (before Linux 5.8, or not Linux).
    :raises ValueError: for an unknown mode, or ``"syncfs"`` where syncfs is not usable.
    """
    try:
        mode = SyncMode(mode)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in SyncMode)
        raise ValueError(f"sync must be one of {choices}, not {mode!r}") from None
    syncfs = syncfs_function() if mode in (SyncMode.AUTO, SyncMode.SYNCFS) else None
    if mode == SyncMode.SYNCFS and syncfs is None:
        raise ValueError("sync='syncfs' needs Linux 5.8 or later")
    if mode == SyncMode.AUTO and syncfs is None:
        mode = SyncMode.FSYNC
    return mode, syncfs


class FlushChooser:
    """For ``sync="auto"``: per batch, the cheaper way lately to make its new files durable.

    One syncfs makes one device flush where the fsyncs of a batch make one per file (and one
    for env_dir), each a thread's wake-up; but it waits for all the dirty data of the
    filesystem, other programs' too, and then costs many times more than the fsyncs. So both
    ways are timed, per size class (batches of 2, 3 or 4, 5 to 8 ... new files), and syncfs is
    used while its last :data:`SAMPLES` flushes of the class cost less than
    :data:`SYNCFS_TOLERANCE` times the fsyncs' (their medians: one slow flush is not a trend);
    the way not in use is tried again now and then (:data:`EXPLORE_EVERY`,
    :data:`RECHECK_EVERY`) to follow changes. A batch of one new file is always fsynced: one
    syncfs could not flush it with fewer calls.
    """

    __slots__ = ("_classes",)

    def __init__(self) -> None:
        self._classes: dict[int, _Costs] = {}

    def use_syncfs(self, files: int) -> bool:
        """Whether to flush a batch of ``files`` new files with one syncfs."""
        if files <= 1:
            return False
        costs = self._classes.setdefault(_size_class(files), _Costs())
        if not costs.syncfs or not costs.fsync:
            return not costs.syncfs  # try each once
        costs.turn += 1
        if _median(costs.syncfs) < SYNCFS_TOLERANCE * _median(costs.fsync):
            return costs.turn % RECHECK_EVERY != 0
        return costs.turn % EXPLORE_EVERY == 0

    def record(self, syncfs: bool, files: int, seconds: float) -> None:
        """What flushing a batch of ``files`` new files cost, one way or the other."""
        if files <= 1:
            return
        costs = self._classes.setdefault(_size_class(files), _Costs())
        (costs.syncfs if syncfs else costs.fsync).append(seconds / files)


class _Costs:
    """The last seconds per file that each way cost, for one size class."""

    __slots__ = ("fsync", "syncfs", "turn")

    def __init__(self) -> None:
        self.fsync: deque[float] = deque(maxlen=SAMPLES)
        self.syncfs: deque[float] = deque(maxlen=SAMPLES)
        self.turn = 0


def _size_class(files: int) -> int:
    return (files - 1).bit_length()


def _median(samples: deque[float]) -> float:
    return sorted(samples)[len(samples) // 2]


class Flusher:
    """The first flush of a commit batch, as the sync mode says: one syncfs, or the fsyncs of
    the batch's new files (and directories), in parallel threads when there are several.

    :param mode: the requested mode (:func:`resolve_sync_mode` gives the one in force).
    :param threads: threads that fsync the files of a batch in parallel.
    """

    def __init__(self, mode: SyncMode | str, *, threads: int = 8) -> None:
        #: The mode in force (``"auto"`` only where syncfs is usable).
        self.mode, self._syncfs = resolve_sync_mode(mode)
        self._chooser = FlushChooser()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="smtpq-disk-sync")

    @property
    def durable(self) -> bool:
        """False for ``"none"``: nothing is ever synced."""
        return self.mode != SyncMode.NONE

    def by_syncfs(self, files: int) -> bool:
        """Whether a batch of ``files`` new files is flushed by one syncfs (else fsyncs)."""
        return self.mode == SyncMode.SYNCFS or (
            self.mode == SyncMode.AUTO and self._chooser.use_syncfs(files)
        )

    def syncfs(self, fd: int, *, files: int) -> None:
        """Flush the whole filesystem holding ``fd``, for a batch of ``files`` new files."""
        assert self._syncfs is not None
        started = time.monotonic()
        self._syncfs(fd)
        self._chooser.record(True, files, time.monotonic() - started)

    def fsync(self, fds: Sequence[int], dirs: Sequence[int], *, files: int) -> list[OSError | None]:
        """Make the open files ``fds`` (their data) and the names in ``dirs`` durable, for a
        batch of ``files`` new files: all at once, one in this thread and the others in the
        sync pool. Each one's error, or None, in the order of ``fds`` then ``dirs``."""
        started = time.monotonic()
        jobs = [(os.fdatasync, fd) for fd in fds] + [(os.fsync, fd) for fd in dirs]
        if not jobs:
            return []
        others = [self._pool.submit(_sync, *job) for job in jobs[1:]]
        errors = [_sync(*jobs[0]), *(future.result() for future in others)]
        self._chooser.record(False, files, time.monotonic() - started)
        return errors

    def close(self) -> None:
        """Stop the sync threads."""
        self._pool.shutdown(wait=True)


def _sync(how: Callable[[int], None], fd: int) -> OSError | None:
    try:
        how(fd)
    except OSError as exc:
        return exc
    return None
