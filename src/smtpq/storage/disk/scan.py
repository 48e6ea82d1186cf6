"""The load scan of a disk queue: every stored message's schedule, from its directories.

It never stops at a bad entry: an unreadable or inconsistent one is quarantined (logged and
counted), this storage's dead predecessors' scratch files are deleted, and orphans — what a
crash left between a message's two renames — are resolved by the rule that a message exists
iff both of its files exist: an ``.env`` alone is deleted (a write or a removal cut short), a
``.meta`` alone is quarantined (its envelope is gone). Writes and removals may go on meanwhile:
a message with one in flight is left alone.

The meta files are read in one thread, each asked for :data:`SCAN_AHEAD` files before it is read
(``POSIX_FADV_WILLNEED`` starts the read and does not wait): on a cold page cache the disk
serves that many reads at once, where one read after another would wait for each, and threads
reading at once would take turns at the interpreter lock around every open, read and close
(bench/RESULTS.md, "Figures moved from the code").
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from smtpq.errors import QueueError
from smtpq.storage.disk.meta import CorruptError, schedule_fields
from smtpq.storage.disk.spool import (
    ENV_NAME,
    ENV_SUFFIX,
    META_NAME,
    META_SUFFIX,
    Spool,
    queue_error,
    read_all,
)
from smtpq.storage.schedule import key_id

__all__ = ["SCAN_AHEAD", "ScanResult", "scan_spool"]

log = logging.getLogger(__name__)

#: Meta files opened (their reads asked for) ahead of the one being read.
SCAN_AHEAD = 64


@dataclass(slots=True)
class ScanResult:
    """What a scan found, by key (:func:`~smtpq.storage.schedule.id_key`: compact, as the
    schedule keeps them), and what it cleaned up."""

    found: dict[int, float] = field(default_factory=dict)  # key -> next attempt time
    held: set[int] = field(default_factory=set)
    orphans: int = 0  # envelopes without a meta, deleted
    scratch: int = 0  # scratch files of dead storage objects, deleted
    corrupt: int = 0  # entries quarantined


def scan_spool(spool: Spool, busy: Container[str], closing: Callable[[], bool]) -> ScanResult:
    """Scan the spool's directories (blocks: a worker thread).

    :param busy: ids with a write or removal in flight, whose files are left alone.
    :param closing: polled while reading; when it turns true the scan stops with QueueError.
    """
    try:
        spool.open()
    except OSError as exc:
        raise queue_error("queue directories unusable", exc) from exc
    started = time.monotonic()
    result = ScanResult()
    with os.scandir(spool.tmp_dir) as it:
        for entry in it:
            if spool.is_leftover(entry.name) and spool.unlink(entry.name, "tmp"):
                result.scratch += 1

    quarantined = spool.quarantined
    keys: list[int] = []
    with os.scandir(spool.meta_dir) as it:
        for entry in it:
            name = entry.name
            if META_NAME.fullmatch(name):
                keys.append(int(name[:32], 16))
    _read_metas(spool, keys, result, closing)  # the keys go on to be the schedule's own
    del keys
    _match_envelopes(spool, busy, result)
    result.corrupt = spool.quarantined - quarantined
    if result.corrupt:
        spool.fsync_dir("meta")
        spool.fsync_dir("corrupt")
    spool.count_corrupt()
    log.info(
        "loaded %d queued messages in %.1f s (%d corrupt, %d orphans and %d scratch files removed)",
        len(result.found),
        time.monotonic() - started,
        result.corrupt,
        result.orphans,
        result.scratch,
    )
    return result


def _read_metas(
    spool: Spool, keys: list[int], result: ScanResult, closing: Callable[[], bool]
) -> None:
    """Read the meta files of ``keys`` into ``result``, each file asked for SCAN_AHEAD files
    before it is read."""
    ahead: deque[tuple[int, int]] = deque()  # (key, fd): opened, read asked for
    try:
        for key in keys:
            if closing():  # a load of a million files need not run to its end
                raise QueueError("the queue storage is closed")
            fd = spool.open_ahead(f"{key:032x}{META_SUFFIX}", "meta", 0)
            if isinstance(fd, OSError):
                _unreadable_meta(spool, key, fd)
                continue
            ahead.append((key, fd))
            if len(ahead) > SCAN_AHEAD:
                _read_meta_fd(spool, *ahead.popleft(), result)
        while ahead:
            _read_meta_fd(spool, *ahead.popleft(), result)
    finally:
        for _, fd in ahead:
            os.close(fd)


def _read_meta_fd(spool: Spool, key: int, fd: int, result: ScanResult) -> None:
    """Read an opened meta file (and close it) into ``result``."""
    try:
        try:
            data = read_all(fd)
        finally:
            os.close(fd)
        timestamp, is_held = schedule_fields(data)
    except CorruptError as exc:
        spool.quarantine(key_id(key), str(exc))
        return
    except OSError as exc:
        _unreadable_meta(spool, key, exc)
        return
    result.found[key] = timestamp
    if is_held:
        result.held.add(key)


def _unreadable_meta(spool: Spool, key: int, exc: OSError) -> None:
    """A meta file that could not be opened or read: gone, not a file, or an I/O error."""
    if isinstance(exc, FileNotFoundError):
        return  # removed meanwhile
    id = key_id(key)
    if exc.errno in (errno.ELOOP, errno.EISDIR):
        spool.quarantine(id, str(exc))
    else:  # maybe transient (EIO, EMFILE): leave the files for the next load
        log.error("cannot read queue entry %s: %s", id, exc)


def _match_envelopes(spool: Spool, busy: Container[str], result: ScanResult) -> None:
    """Every message needs its envelope: delete envelopes without a meta, quarantine metas
    without an envelope (unless a write or removal of theirs is in flight)."""
    # A directory listing names each file that stays put exactly once, so counting the
    # envelopes of found messages tells whether one is missing, without a set of a million
    # names; only then are they looked for.
    found, matched = result.found, 0
    with os.scandir(spool.env_dir) as it:
        for entry in it:
            name = entry.name
            if not ENV_NAME.fullmatch(name):
                continue
            if int(name[:32], 16) in found:
                matched += 1
            # An envelope whose meta never appeared (a write cut short) or is gone (a
            # removal cut short) is not a message.
            elif (
                name[:32] not in busy
                and not spool.exists(name[:32] + META_SUFFIX, "meta")
                and spool.unlink(name, "env")
            ):
                result.orphans += 1
    if matched == len(found):
        return
    with os.scandir(spool.env_dir) as it:
        envs = {int(e.name[:32], 16) for e in it if ENV_NAME.fullmatch(e.name)}
    for key in [k for k in found if k not in envs]:
        id = key_id(key)
        if id in busy or spool.exists(id + ENV_SUFFIX, "env"):
            continue
        del found[key]
        result.held.discard(key)
        if spool.exists(id + META_SUFFIX, "meta"):
            spool.quarantine(id, "envelope file missing")
