"""ShardLock: one owner per queue directory, on real files and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtpq.storage.lock import ShardLock, ShardLocked

HOLD = """
import sys
from smtpq.storage.lock import ShardLock
lock = ShardLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_second_owner_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    with ShardLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
        # A second open of the lock file is a second owner, even in the same process.
        with pytest.raises(ShardLocked) as refused:
            ShardLock(tmp_path).acquire()
        assert refused.value.pid == os.getpid()
        assert refused.value.path == tmp_path
        assert str(refused.value) == (
            f"queue directory {tmp_path} is in use by process {os.getpid()}"
        )
    assert not lock.held
    ShardLock(tmp_path).acquire().release()  # free again once released


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(ShardLocked) as refused:
            ShardLock(tmp_path).acquire()
        assert refused.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The lock file is still there (with the dead pid in it): holding is what counts.
    assert (tmp_path / "lock").read_text() == f"{holder.pid}\n"
    with ShardLock(tmp_path) as lock:
        assert lock.held


def test_a_child_inherits_the_lock_and_keeps_it_after_the_parent_lets_go(tmp_path: Path) -> None:
    lock = ShardLock(tmp_path).acquire()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from smtpq.storage.lock import ShardLock;"
            "ShardLock.inherit(sys.argv[1], int(sys.argv[2])); print('adopted', flush=True);"
            "sys.stdin.read()",
            str(tmp_path),
            str(lock.fileno),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=[lock.fileno],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"adopted\n"
        lock.release()  # closing the parent's descriptor does not unlock the child's
        with pytest.raises(ShardLocked):
            ShardLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    ShardLock(tmp_path).acquire().release()


def test_inherit_refuses_a_descriptor_that_is_not_the_held_lock(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("")
    with ShardLock(tmp_path):
        # The lock file itself, but a second open of it: someone else's lock, not ours.
        fd = os.open(tmp_path / "lock", os.O_RDWR)
        try:
            with pytest.raises(ShardLocked):
                ShardLock.inherit(tmp_path, fd)
        finally:
            os.close(fd)
        fd = os.open(other, os.O_RDONLY)
        try:
            with pytest.raises(ValueError, match="is not the lock file"):
                ShardLock.inherit(tmp_path, fd)
        finally:
            os.close(fd)


def test_a_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ShardLock(tmp_path / "absent").acquire()
    assert not (tmp_path / "absent").exists()
