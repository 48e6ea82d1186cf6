"""The spool: a disk queue's four directories and the files in them (worker threads only).

Layout (every file ``0600``, directories the spool creates ``0700``, all on one filesystem so
that renames between them are atomic)::

    env_dir/<id>.env      the envelope, Envelope.to_bytes(); written once, never changed
    meta_dir/<id>.meta    next attempt, attempts, delivered recipients, held, last reply
    tmp_dir/              scratch files (default meta_dir/tmp), renamed into place when durable
    corrupt_dir/          quarantined entries (default meta_dir/corrupt); load() never reads it

Scratch files are named ``<token>.<counter>.tmp``, the token random per spool object, so that a
load can tell its own files from a dead process's leftovers.

Files taken out of the queue (removed messages, replaced metas) are moved to tmp_dir and reused,
inode and blocks, for the next scratch files (up to :data:`POOL_SIZE`; the rest are unlinked,
and so are all of them when the spool closes), so that a busy queue neither frees nor allocates
inodes and blocks: on ext4 without a journal, creating files where many were deleted in the
last minutes is many times slower, and on a filesystem mounted with ``discard`` every freed
block costs a TRIM. A removed message's bytes thus stay in tmp_dir (owner-only) until its file
is overwritten by a new message, as the blocks of an unlinked file stay on the disk.

Reading must not write: files are opened with ``O_NOATIME`` where the process owns them, or the
first read of each file after it was written would update its atime (relatime), and a load of
a million messages would write back a million inodes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import threading
from typing import Literal

from smtpq.errors import MessageGone, QueueError
from smtpq.storage.base import is_valid_id
from smtpq.storage.disk.libc import exchange_function
from smtpq.storage.disk.meta import CorruptError, Meta, decode_meta

__all__ = [
    "ENV_NAME",
    "ENV_SUFFIX",
    "META_NAME",
    "META_SUFFIX",
    "POOL_SIZE",
    "Role",
    "Spool",
    "check_id",
    "queue_error",
]

log = logging.getLogger(__name__)

#: A directory of the spool.
Role = Literal["env", "meta", "tmp", "corrupt"]

ENV_SUFFIX = ".env"
META_SUFFIX = ".meta"
#: The names of stored envelopes and metas (anything else in their directories is left alone).
ENV_NAME = re.compile(r"[0-9a-f]{32}\.env")
META_NAME = re.compile(r"[0-9a-f]{32}\.meta")
_SCRATCH = re.compile(r"[0-9a-f]{8}\.[0-9a-f]+\.tmp")
#: Files taken out of the queue that are kept for reuse.
POOL_SIZE = 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
_REUSE_FILE = os.O_WRONLY | os.O_NOFOLLOW | _CLOEXEC
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC
_READ_NOATIME = _READ_FILE | getattr(os, "O_NOATIME", 0)


def check_id(id: object) -> str:
    """The id if it has the form of :func:`~smtpq.storage.base.new_id`; MessageGone otherwise:
    no other string can name a stored file (nor a path outside the queue directories)."""
    if not isinstance(id, str) or not is_valid_id(id):
        raise MessageGone(str(id))
    return id


def queue_error(what: str, exc: OSError) -> QueueError:
    """The QueueError (``451 4.3.0``) of a failed file operation."""
    error = QueueError(f"{what}: {exc.strerror or exc}")
    error.__cause__ = exc
    return error


def read_all(fd: int) -> bytes:
    """The whole of an open file (a meta file is one read)."""
    data = os.read(fd, 65536)
    if len(data) == 65536:
        chunks = [data]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        data = b"".join(chunks)
    return data


class Spool:
    """The directories and files of one disk queue; every method blocks (worker threads).

    :param env_dir: the envelopes' directory; ``meta_dir``, ``tmp_dir``, ``corrupt_dir`` the
        others' (absolute paths, all on one filesystem).
    :param durable: whether new directories are made durable (fsync of their parent); False
        only for ``sync="none"``.
    """

    def __init__(
        self, env_dir: str, meta_dir: str, tmp_dir: str, corrupt_dir: str, *, durable: bool
    ) -> None:
        self.env_dir, self.meta_dir, self.tmp_dir = env_dir, meta_dir, tmp_dir
        self.corrupt_dir = corrupt_dir
        self.durable = durable
        self._exchange = exchange_function()
        self._read_flags = _READ_NOATIME
        self._token = secrets.token_hex(4)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._pool: list[str] = []
        self._pool_lock = threading.Lock()
        self._dirs_lock = threading.Lock()
        self._dfd: dict[Role, int] = {}
        self._stats_lock = threading.Lock()
        self._quarantined = 0
        self._corrupt_stored = 0

    # -- directories ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the four directories (creating missing ones), once; QueueError unless they are
        on one filesystem, OSError when they cannot be made."""
        if self._dfd:
            return
        with self._dirs_lock:
            if self._dfd:
                return
            paths: dict[Role, str] = {
                "env": self.env_dir,
                "meta": self.meta_dir,
                "tmp": self.tmp_dir,
                "corrupt": self.corrupt_dir,
            }
            fds: dict[Role, int] = {}
            try:
                for role, path in paths.items():
                    self._make_dir(path)
                    fds[role] = os.open(path, _DIR_FLAGS)
                if len({os.fstat(fd).st_dev for fd in fds.values()}) != 1:
                    raise QueueError(
                        "env_dir, meta_dir, tmp_dir and corrupt_dir must be on one filesystem"
                    )
            except BaseException:
                for fd in fds.values():
                    os.close(fd)
                raise
            self._dfd = fds

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
        if self.durable:
            fd = os.open(parent, _DIR_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def fd(self, role: Role) -> int:
        """The open directory ``role`` (after :meth:`open`)."""
        return self._dfd[role]

    def fsync_dir(self, role: Role) -> None:
        """Make the names in a directory durable (nothing when the spool is not durable)."""
        if self.durable:
            os.fsync(self._dfd[role])

    def close(self) -> None:
        """Unlink the files kept for reuse and close the directories."""
        names, self._pool = self._pool, []
        for name in names:
            self.unlink(name, "tmp")
        fds, self._dfd = self._dfd, {}
        for fd in fds.values():
            os.close(fd)

    # -- scratch files and reuse ---------------------------------------------------------------

    def scratch_name(self) -> str:
        """A new name for a file in tmp_dir that this spool object owns."""
        with self._seq_lock:
            self._seq += 1
            return f"{self._token}.{self._seq:x}.tmp"

    def is_leftover(self, name: str) -> bool:
        """Whether a name in tmp_dir is a scratch file of another (dead) spool object."""
        return _SCRATCH.fullmatch(name) is not None and not name.startswith(f"{self._token}.")

    def new_scratch(self, data: bytes) -> tuple[str, int]:
        """A scratch file holding ``data`` (not yet durable): its name in tmp_dir and its fd,
        open for the caller to sync and close.

        A file kept for reuse is overwritten when there is one (see the module documentation).
        """
        tmp = self._dfd["tmp"]
        fd = -1
        with self._pool_lock:
            name = self._pool.pop() if self._pool else None
        if name is not None:
            try:
                fd = os.open(name, _REUSE_FILE, dir_fd=tmp)  # a planted symlink: ELOOP
            except OSError:
                self.unlink(name, "tmp")
        if fd < 0:
            name = self.scratch_name()
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
            self.unlink(name, "tmp")
            raise
        return name, fd

    def recycle(self, names: list[str]) -> None:
        """Keep files moved out of the queue (inodes and blocks) for new scratch files."""
        with self._pool_lock:
            room = max(0, POOL_SIZE - len(self._pool))
            self._pool.extend(names[:room])
        for name in names[room:]:
            self.unlink(name, "tmp")

    def move_in(self, scratch: str, name: str, role: Role) -> None:
        """Rename a scratch file into a queue directory."""
        os.rename(scratch, name, src_dir_fd=self._dfd["tmp"], dst_dir_fd=self._dfd[role])

    def move_out(self, name: str, role: Role) -> str | None:
        """Move a queue file into tmp_dir (to be recycled); its new name, None if it was gone."""
        target = self.scratch_name()
        try:
            os.rename(name, target, src_dir_fd=self._dfd[role], dst_dir_fd=self._dfd["tmp"])
        except FileNotFoundError:
            return None
        return target

    def replace_meta(self, scratch: str, id: str) -> bool:
        """Atomically put a scratch file in place of a meta file.

        True when the two were exchanged (``RENAME_EXCHANGE``), so that ``scratch`` now names
        the old meta's inode, for recycling; False when it was a plain rename.
        """
        tmp, meta = self._dfd["tmp"], self._dfd["meta"]
        name = id + META_SUFFIX
        if self._exchange is not None:
            try:
                self._exchange(tmp, scratch, meta, name)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            self._exchange = None  # this filesystem cannot exchange: plain renames from now on
        os.rename(scratch, name, src_dir_fd=tmp, dst_dir_fd=meta)
        return False

    def unlink(self, name: str, role: Role) -> bool:
        """Unlink if present; True when something was removed (errors are logged)."""
        try:
            os.unlink(name, dir_fd=self._dfd[role])
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot remove %s/%s: %s", role, name, exc)
            return False
        return True

    def exists(self, name: str, role: Role) -> bool:
        """Whether a directory holds ``name`` (a symlink too: it is not followed)."""
        try:
            os.stat(name, dir_fd=self._dfd[role], follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    # -- reading -------------------------------------------------------------------------------

    def open_read(self, name: str, role: Role) -> int:
        """Open a queue file for reading (never through a symlink: ELOOP)."""
        dir_fd = self._dfd[role]
        try:
            return os.open(name, self._read_flags, dir_fd=dir_fd)
        except PermissionError:
            if self._read_flags == _READ_FILE:
                raise
            self._read_flags = _READ_FILE  # not the files' owner: no O_NOATIME
            return os.open(name, _READ_FILE, dir_fd=dir_fd)

    def open_ahead(self, name: str, role: Role, length: int) -> int | OSError:
        """Open a file and ask for its first ``length`` bytes (0: all of it) to be read in the
        background (``POSIX_FADV_WILLNEED`` does not wait); the fd, or what opening raised."""
        try:
            fd = self.open_read(name, role)
        except OSError as exc:
            return exc
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        return fd

    def read(self, name: str, role: Role) -> bytes:
        """The whole of a queue file."""
        fd = self.open_read(name, role)
        try:
            return read_all(fd)
        finally:
            os.close(fd)

    def read_meta(self, id: str) -> Meta:
        """The meta of a stored message: MessageGone unless both of its files exist,
        CorruptError if the meta is bad or not a file."""
        try:
            data = self.read(id + META_SUFFIX, "meta")
            os.stat(id + ENV_SUFFIX, dir_fd=self._dfd["env"], follow_symlinks=False)
        except FileNotFoundError:
            raise MessageGone(id) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):
                raise CorruptError(str(exc)) from exc
            raise
        return decode_meta(data)

    # -- quarantine ----------------------------------------------------------------------------

    def quarantine(self, id: str, reason: str) -> bool:
        """Move an entry's files (meta first) to the corrupt directory, logged and counted;
        True if any moved. Not synced: the caller fsyncs meta_dir and corrupt_dir."""
        moved = False
        files: tuple[tuple[str, Role], ...] = ((META_SUFFIX, "meta"), (ENV_SUFFIX, "env"))
        for suffix, role in files:
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
                self._quarantined += 1
                self._corrupt_stored += 1
        return moved

    @property
    def quarantined(self) -> int:
        """Entries this spool object moved to the corrupt directory."""
        return self._quarantined

    @property
    def corrupt_stored(self) -> int:
        """Entries in the corrupt directory, as last counted (plus those moved since)."""
        return self._corrupt_stored

    def count_corrupt(self) -> int:
        """Count the entries in the corrupt directory (one per id, whatever its files)."""
        with os.scandir(self.corrupt_dir) as it:
            stored = len({entry.name.split(".", 1)[0] for entry in it})
        with self._stats_lock:
            self._corrupt_stored = stored
        return stored
