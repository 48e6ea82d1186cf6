"""The segment files of a journal directory (blocking I/O, run in the journal's threads).

Segments are named by a sequence number, ``00000001.log``, ``00000002.log``, ...; records are
appended only to the newest, the *active* segment, which each start of the storage opens anew.
One append is one ``write`` of a whole batch of records and one ``fdatasync``: the data and the
file's new size are durable when it returns. A segment's directory entry is made durable once,
when it is created (its header written and flushed, then the directory fsynced), so that the
appends after it need no directory flush.
"""

from __future__ import annotations

import contextlib
import os
import re

from smtpq.storage.journal.records import SEGMENT_HEADER

__all__ = ["SegmentFiles"]

_NAME = re.compile(r"(\d{8,})\.log")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentFiles:
    """The segment files in ``path``; the writing methods are for one thread at a time.

    :param durable: flush each append (``fdatasync``); ``False`` only for tests and benchmarks.
    """

    def __init__(self, path: str, corrupt_dir: str, *, durable: bool = True) -> None:
        self.path = path
        self.corrupt_dir = corrupt_dir
        self.durable = durable
        self.active: int | None = None  # the segment appended to, once one is created
        self.size = 0  # bytes of the active segment
        self._fd: int | None = None
        self._broken = False  # an append failed and could not be undone: start a new segment

    # -- names ---------------------------------------------------------------------------------

    def name(self, number: int) -> str:
        """The path of segment ``number``."""
        return os.path.join(self.path, f"{number:08d}.log")

    def numbers(self) -> list[int]:
        """The segments present, oldest first."""
        found = []
        for entry in os.listdir(self.path):
            match = _NAME.fullmatch(entry)
            if match:
                found.append(int(match[1]))
        return sorted(found)

    # -- writing -------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories (``0700``) if missing."""
        for path in (self.path, self.corrupt_dir):
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                _fsync_dir(os.path.dirname(os.path.abspath(path)))

    def start_segment(self, after: int) -> None:
        """Create segment ``after + 1`` and make it the active one (durable when it returns)."""
        number = after + 1
        fd = os.open(self.name(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, SEGMENT_HEADER)
            if self.durable:
                os.fdatasync(fd)
                _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.name(number))
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.active, self.size, self._broken = fd, number, len(SEGMENT_HEADER), False

    def append(self, data: bytes, roll_at: int, flush: bool = True) -> tuple[int, int]:
        """Append ``data`` to the active segment (a new one once it holds ``roll_at`` bytes,
        or after a failed append) and flush it (unless ``flush`` is false: then it is written,
        which the process's death cannot undo, and flushed with a later append or by the
        kernel); ``(segment, offset)`` where ``data`` begins.

        On an error nothing of ``data`` stays: the segment is cut back to where it was (or,
        when that fails too, the next append starts a new segment).
        """
        if self._fd is None or self._broken or self.size >= roll_at:
            self.start_segment(self.active if self.active is not None else self.newest())
        assert self._fd is not None
        assert self.active is not None
        start = self.size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if flush and self.durable:
                os.fdatasync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self._broken = True
            raise
        self.size = start + len(data)
        return self.active, start

    def newest(self) -> int:
        """The highest segment number present (0 when there is none)."""
        numbers = self.numbers()
        return numbers[-1] if numbers else 0

    def delete(self, number: int) -> None:
        """Delete segment ``number``, durably: a segment deleted later must never outlive it,
        or its messages would come back without the removals that the later one held."""
        os.unlink(self.name(number))
        if self.durable:
            _fsync_dir(self.path)

    def truncate(self, number: int, size: int) -> None:
        """Cut segment ``number`` to ``size`` bytes (its torn tail), durably."""
        fd = os.open(self.name(number), os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the active segment."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading -------------------------------------------------------------------------------

    def read_many(self, places: list[tuple[int, int, int]]) -> list[bytes | None]:
        """The bytes at each ``(segment, offset, size)`` (fewer at a segment's end), each
        segment opened once; ``None`` where the segment is gone (deleted after compaction
        moved what it held)."""
        fds: dict[int, int | None] = {}
        try:
            found: list[bytes | None] = []
            for number, offset, size in places:
                if number not in fds:
                    try:
                        fds[number] = os.open(self.name(number), os.O_RDONLY)
                    except FileNotFoundError:
                        fds[number] = None
                fd = fds[number]
                found.append(None if fd is None else os.pread(fd, size, offset))
            return found
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)

    def read_all(self, number: int) -> bytes:
        """The whole of segment ``number``."""
        with open(self.name(number), "rb") as f:
            return f.read()

    # -- quarantine ----------------------------------------------------------------------------

    def keep_once(self, name: str, data: bytes) -> str:
        """Store ``data`` in the corrupt directory as ``name`` (``0600``), unless a file of that
        name is there already; its path."""
        path = os.path.join(self.corrupt_dir, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path
        try:
            os.write(fd, data)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.durable:
            _fsync_dir(self.corrupt_dir)
        return path

    def corrupt_stored(self) -> int:
        """Files in the corrupt directory."""
        try:
            return len(os.listdir(self.corrupt_dir))
        except FileNotFoundError:
            return 0
