"""How a disk queue makes new files durable: the sync modes and the first flush of a batch.

* ``"fsync"``: each new file is fsynced, in parallel threads when there are several (the device
  merges the flushes of concurrent fsyncs), before a meta names it.
* ``"syncfs"``: one ``syncfs(2)`` per batch makes its new files durable. This flushes everything
  dirty on the filesystem, other programs' data included, so a spool that shares its
  filesystem with a heavy writer waits for that writer's data too. Only since Linux 5.8 does
  syncfs report write-back errors, hence the version check.
* ``"auto"`` (default): per batch, ``"fsync"`` for a few new files (a lone write does not wait
  for other programs' data); for more than :data:`SYNCFS_FROM`, whichever of the two cost
  less lately (one syncfs usually, unless other programs keep much dirty data on the same
  filesystem); ``"fsync"`` where syncfs is not usable.
* ``"none"``: **unsafe** — no fsync at all. Renames stay atomic, so a killed process loses
  nothing, but a power failure or kernel crash can lose or empty messages that were
  acknowledged. For tests and benchmarks only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

from smtpq.storage.disk.libc import syncfs_function

__all__ = ["SYNCFS_FROM", "FlushChooser", "Flusher", "SyncMode", "resolve_sync_mode"]

#: In "auto" mode, a batch with more new files than this may be flushed by one syncfs.
SYNCFS_FROM = 16
# At most this many fsyncs of a batch are made one after the other in the calling thread; more
# go to the sync pool in parallel.
_INLINE_FSYNCS = 3
_EXPLORE_EVERY = 16  # batches between tries of the way that has been dearer lately


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
    """For ``sync="auto"``: per batch, the cheaper way to make its new files durable.

    A few files are fsynced (a lone write must not wait for other programs' dirty data). For
    more, one syncfs usually costs far less than their fsyncs, unless the filesystem holds much
    of other programs' dirty data, which syncfs must write too. So both are timed, on batches
    of more than :data:`SYNCFS_FROM` files, and the one that cost less lately is used, the
    other tried now and then to follow changes.
    """

    __slots__ = ("_fsync_per_file", "_syncfs", "_turn")

    def __init__(self) -> None:
        self._fsync_per_file: float | None = None  # seconds, moving averages
        self._syncfs: float | None = None
        self._turn = 0

    def use_syncfs(self, files: int) -> bool:
        """Whether to flush a batch of ``files`` new files with one syncfs."""
        if files <= SYNCFS_FROM:
            return False
        if self._syncfs is None or self._fsync_per_file is None:
            return self._syncfs is None  # try each once
        self._turn += 1
        cheaper = self._syncfs < self._fsync_per_file * files
        return cheaper != (self._turn % _EXPLORE_EVERY == 0)

    def record(self, syncfs: bool, files: int, seconds: float) -> None:
        """What flushing a batch cost."""
        if files <= SYNCFS_FROM:
            return
        if syncfs:
            self._syncfs = _average(self._syncfs, seconds)
        else:
            self._fsync_per_file = _average(self._fsync_per_file, seconds / files)


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.7 * old + 0.3 * new


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

    def syncfs(self, fd: int, files: int) -> None:
        """Flush the whole filesystem holding ``fd`` (a batch of ``files`` new files)."""
        assert self._syncfs is not None
        started = time.monotonic()
        self._syncfs(fd)
        self._chooser.record(True, files, time.monotonic() - started)

    def fsync(self, fds: Sequence[int], files: int) -> list[OSError | None]:
        """Fsync ``fds`` (a batch of ``files`` new files); each one's error, or None."""
        started = time.monotonic()
        # A lone write (two files and env_dir) is flushed here, in order: handing three fsyncs
        # to the pool cost more CPU (thread wake-ups, GIL hand-offs) than their overlap saved
        # (bench/RESULTS.md, 1 session).
        if len(fds) > _INLINE_FSYNCS:
            errors = list(self._pool.map(_fsync, fds))
        else:
            errors = [_fsync(fd) for fd in fds]
        self._chooser.record(False, files, time.monotonic() - started)
        return errors

    def close(self) -> None:
        """Stop the sync threads."""
        self._pool.shutdown(wait=True)


def _fsync(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None
