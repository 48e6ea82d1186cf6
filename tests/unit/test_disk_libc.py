"""The C library calls of a disk queue: syncfs where it reports errors, renameat2's exchange."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from smtpq.storage.disk.libc import exchange_function, syncfs_function


def test_syncfs_flushes_the_filesystem_of_an_fd_and_reports_errors(tmp_path: Path) -> None:
    syncfs = syncfs_function()
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    assert (syncfs is not None) == (os.uname().sysname == "Linux" and release >= (5, 8))
    if syncfs is None:
        return
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as caught:
        syncfs(fd)  # closed
    assert caught.value.errno == errno.EBADF
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def test_exchange_swaps_two_names_atomically(tmp_path: Path) -> None:
    exchange = exchange_function()
    if exchange is None:
        pytest.skip("no renameat2 in this C library")
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        exchange(fd, "a", fd, "b")
        assert ((tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()) == (b"B", b"A")
        with pytest.raises(OSError, match="No such file") as caught:
            exchange(fd, "missing", fd, "a")
        assert caught.value.errno == errno.ENOENT
    finally:
        os.close(fd)
