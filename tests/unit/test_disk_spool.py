"""The spool of a disk queue: its directories, scratch files and their reuse, quarantine."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpq.errors import MessageGone, QueueError
from smtpq.storage.disk import spool as spool_module
from smtpq.storage.disk.meta import CorruptError, Meta, encode_meta
from smtpq.storage.disk.spool import Spool, check_id
from tests.unit.disk_files import NOW, DiskFiles


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskFiles]:
    with DiskFiles(tmp_path) as files:
        yield files


def test_open_makes_owner_only_directories_once(disk: DiskFiles) -> None:
    for path in (disk.env, disk.meta, disk.tmp, disk.corrupt):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    fd = disk.spool.fd("env")
    disk.spool.open()
    assert disk.spool.fd("env") == fd


def test_directories_on_two_filesystems_are_refused(tmp_path: Path, small_fs: Path) -> None:
    meta = str(tmp_path / "meta")
    spool = Spool(str(tmp_path / "env"), meta, str(small_fs / "tmp"), meta + "/c", durable=True)
    with pytest.raises(QueueError, match="one filesystem"):
        spool.open()


def test_files_taken_out_are_reused_inode_and_blocks(disk: DiskFiles) -> None:
    spool = disk.spool
    name, fd = spool.new_scratch(b"the launch codes" * 400)
    os.close(fd)
    inode = (disk.tmp / name).stat().st_ino
    spool.move_in(name, "x.env", "env")
    old = spool.move_out("x.env", "env")
    assert old is not None
    assert spool.move_out("x.env", "env") is None  # gone already
    spool.recycle([old])
    again, fd = spool.new_scratch(b"short")
    os.close(fd)
    assert (again, (disk.tmp / again).stat().st_ino) == (old, inode)
    assert (disk.tmp / again).read_bytes() == b"short"  # overwritten and cut to size
    spool.close()
    assert disk.names(disk.tmp) == {again}  # in use: not one the spool kept for reuse


def test_at_most_pool_size_files_are_kept(disk: DiskFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "POOL_SIZE", 2)
    names = []
    for data in (b"a", b"b", b"c"):
        name, fd = disk.spool.new_scratch(data)
        os.close(fd)
        names.append(name)
    disk.spool.recycle(names)
    assert disk.names(disk.tmp) == set(names[:2])
    disk.spool.close()
    assert disk.names(disk.tmp) == set()


def test_a_symlink_planted_in_place_of_a_kept_file_is_not_followed(
    disk: DiskFiles, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"not the queue's")
    name, fd = disk.spool.new_scratch(b"old")
    os.close(fd)
    disk.spool.recycle([name])
    (disk.tmp / name).unlink()
    (disk.tmp / name).symlink_to(target)
    new, fd = disk.spool.new_scratch(b"new")
    os.close(fd)
    assert new != name
    assert target.read_bytes() == b"not the queue's"


def test_replace_meta_swaps_in_the_new_one_and_hands_back_the_old(disk: DiskFiles) -> None:
    id = disk.write()
    old = (disk.meta / f"{id}.meta").read_bytes()
    name, fd = disk.spool.new_scratch(encode_meta(Meta(NOW + 60)))
    os.close(fd)
    exchanged = disk.spool.replace_meta(name, id)
    assert disk.spool.read_meta(id) == Meta(NOW + 60)
    if exchanged:  # renameat2(RENAME_EXCHANGE): the scratch name now holds the old meta
        assert (disk.tmp / name).read_bytes() == old
    else:
        assert not (disk.tmp / name).exists()


def test_read_meta_needs_both_files_and_a_meta_that_is_a_file(disk: DiskFiles) -> None:
    id, other = disk.write(1), disk.write(2)
    assert disk.spool.read_meta(id) == Meta(NOW)
    (disk.env / f"{id}.env").unlink()
    with pytest.raises(MessageGone):
        disk.spool.read_meta(id)
    (disk.meta / f"{other}.meta").unlink()
    (disk.meta / f"{other}.meta").mkdir()
    with pytest.raises(CorruptError):
        disk.spool.read_meta(other)


def test_quarantine_moves_both_files_and_numbers_repeats(disk: DiskFiles) -> None:
    id = disk.write()
    assert disk.spool.quarantine(id, "test")
    (disk.meta / f"{id}.meta").write_bytes(b"again")
    assert disk.spool.quarantine(id, "test")
    assert not disk.spool.quarantine(id, "nothing left")
    names = {f"{id}.meta", f"{id}.env", f"{id}.meta.1"}
    assert disk.names(disk.corrupt) == names
    assert (disk.spool.quarantined, disk.spool.count_corrupt()) == (2, 1)  # one id


def test_scratch_files_of_another_spool_object_are_leftovers(disk: DiskFiles) -> None:
    dirs = (disk.env, disk.meta, disk.tmp, disk.corrupt)
    other = Spool(*map(str, dirs), durable=True)
    assert disk.spool.is_leftover(other.scratch_name())
    assert not disk.spool.is_leftover(disk.spool.scratch_name())
    for foreign in ("notes.txt", "x.1.tmp", "deadbeef.tmp", "0" * 32 + ".env"):
        assert not disk.spool.is_leftover(foreign)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "0" * 31, "A" * 32, 7, None])
def test_only_queue_ids_name_files(bad: object) -> None:
    assert check_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2
    with pytest.raises(MessageGone):
        check_id(bad)
