"""One owner per queue directory: an exclusive ``flock`` on ``<directory>/lock``.

A disk queue must be used by one process at a time: two would each deliver the same messages,
and each one's start-up would clean up the other's scratch files. The owner takes the lock
before it touches anything in the directory and holds it for its whole life; the kernel
releases it when the owner's last descriptor of the lock file closes, so a process that dies
(even by SIGKILL) frees the directory with nothing to clean up. A lock file left behind is
harmless: holding the lock is what counts, not the file. The file holds the pid of the process
that took the lock, for the message that a second would-be owner gets.

An ``flock`` belongs to the open file, not to the process: descriptors that a child inherits
share the lock. A supervisor can take the locks of every shard and pass them to its workers
(``pass_fds``); the lock then lives while any of them lives, and a worker that is restarted
gets it again from the supervisor rather than racing others for it. That is also why
:meth:`ShardLock.release` only closes its descriptor and never unlocks: unlocking would
release the lock for every process sharing it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from smtpq.errors import SmtpqError

__all__ = ["LOCK_FILE", "ShardLock", "ShardLocked"]

LOCK_FILE = "lock"


class ShardLocked(SmtpqError):
    """Another process owns the queue directory.

    :ivar path: the directory.
    :ivar pid: the process that took the lock (None if it has not written its pid yet).
    """

    def __init__(self, path: str | os.PathLike[str], pid: int | None) -> None:
        self.path = Path(path)
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"queue directory {self.path} is in use by {holder}")


class ShardLock:
    """The exclusive lock of one queue directory (which must exist).

    Use as ``with ShardLock(directory):`` or :meth:`acquire` it for the process's life;
    :attr:`fileno` is the descriptor to pass to child processes.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    @property
    def fileno(self) -> int:
        """The lock file's descriptor (only while held)."""
        if self._fd is None:
            raise RuntimeError(f"the lock of {self.directory} is not held")
        return self._fd

    def acquire(self) -> ShardLock:
        """Take the lock at once, or raise :class:`ShardLocked` naming its holder.

        OSError (a missing directory, permission denied) propagates as it is.
        """
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise ShardLocked(self.directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    @classmethod
    def inherit(cls, directory: str | os.PathLike[str], fd: int) -> ShardLock:
        """Adopt the descriptor of ``directory``'s lock that a parent process passed down.

        The descriptor must be that lock file, opened by the process that holds the lock
        (taking it again on the same open file succeeds; on any other it would not): a wrong
        descriptor is a ValueError, a lock held by someone else :class:`ShardLocked`.
        """
        lock = cls(directory)
        mine, theirs = os.fstat(fd), os.stat(lock.path)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            raise ValueError(f"descriptor {fd} is not the lock file of {lock.directory}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardLocked(lock.directory, _read_pid(fd)) from None
        os.set_inheritable(fd, False)
        lock._fd = fd
        return lock

    def release(self) -> None:
        """Close the descriptor: the lock goes when no process holds one any more."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> ShardLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ShardLock({str(self.directory)!r}, held={self.held})"


def _read_pid(fd: int) -> int | None:
    """The pid in a lock file; None if there is none (yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
