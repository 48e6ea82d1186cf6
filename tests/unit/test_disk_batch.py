"""One commit batch of a disk queue (BatchWriter), on real files, without an event loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpq.errors import MessageGone, QueueError
from smtpq.storage.base import new_id
from smtpq.storage.disk.batch import Op, OpKind
from smtpq.storage.disk.libc import syncfs_function
from smtpq.storage.disk.meta import Meta, decode_meta, encode_meta
from tests.unit.disk_files import NOW, DiskFiles, envelope

MODES = ["fsync", "none", "auto"] + (["syncfs"] if syncfs_function() else [])


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskFiles]:
    with DiskFiles(tmp_path) as files:
        yield files


@pytest.mark.parametrize("sync", MODES)
def test_writes_put_both_files_in_place_and_leave_no_scratch(tmp_path: Path, sync: str) -> None:
    with DiskFiles(tmp_path, sync) as disk:
        ops = disk.commit(
            *(
                Op(OpKind.WRITE, new_id(NOW), env=envelope(n).to_bytes(), meta=Meta(NOW + n))
                for n in range(2)
            )
        )
        for n, op in enumerate(ops):
            assert op.error is None
            assert decode_meta((disk.meta / f"{op.id}.meta").read_bytes()) == Meta(NOW + n)
        assert (disk.env / f"{ops[0].id}.env").read_bytes() == envelope(0).to_bytes()
        assert disk.names(disk.tmp) == set()


def test_updates_of_one_message_apply_in_order(disk: DiskFiles) -> None:
    id = disk.write()

    def count(meta: Meta) -> int:
        meta.attempts += 1
        return meta.attempts

    ops = disk.commit(*(Op(OpKind.UPDATE, id, fn=count) for _ in range(3)))
    assert [op.result for op in ops] == [1, 2, 3]
    assert disk.spool.read_meta(id).attempts == 3
    assert ops[-1].meta == Meta(NOW, 3)  # what the schedule needs to know after each


def test_an_update_that_changes_nothing_writes_nothing(disk: DiskFiles) -> None:
    id = disk.write()
    before = (disk.meta / f"{id}.meta").stat()
    assert disk.update(id, held=False).error is None
    after = (disk.meta / f"{id}.meta").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_removal_takes_both_files_and_what_follows_finds_it_gone(disk: DiskFiles) -> None:
    id = disk.write()
    remove, update, again = disk.commit(
        Op(OpKind.REMOVE, id), Op(OpKind.UPDATE, id, fn=lambda meta: None), Op(OpKind.REMOVE, id)
    )
    assert (remove.error, again.error) == (None, None)  # removing twice is no error
    assert isinstance(update.error, MessageGone)
    assert disk.names(disk.env) == disk.names(disk.meta) - {"tmp", "corrupt"} == set()
    assert isinstance(disk.update(id, held=True).error, MessageGone)


def test_a_corrupt_meta_met_by_an_update_is_quarantined(disk: DiskFiles) -> None:
    id = disk.write()
    (disk.meta / f"{id}.meta").write_bytes(encode_meta(Meta(NOW))[:-3])
    assert isinstance(disk.update(id, held=True).error, MessageGone)
    assert disk.names(disk.corrupt) == {f"{id}.meta", f"{id}.env"}


def test_a_quarantine_takes_the_message_from_the_rest_of_its_batch(disk: DiskFiles) -> None:
    id = disk.write()
    update, quarantine = disk.commit(
        Op(OpKind.UPDATE, id, fn=lambda meta: None), Op(OpKind.QUARANTINE, id)
    )
    assert (isinstance(update.error, MessageGone), quarantine.error) == (True, None)
    assert disk.names(disk.corrupt) == {f"{id}.meta", f"{id}.env"}


def test_a_failing_change_fails_its_message_only(disk: DiskFiles) -> None:
    bad, good = disk.write(1), disk.write(2)

    def broken(meta: Meta) -> None:
        raise RuntimeError("a bug")

    failed, fine = disk.commit(
        Op(OpKind.UPDATE, bad, fn=broken), Op(OpKind.UPDATE, good, fn=lambda m: None)
    )
    assert isinstance(failed.error, QueueError)
    assert fine.error is None
    assert disk.names(disk.tmp) == set()


def test_unusable_directories_fail_every_operation(disk: DiskFiles) -> None:
    id = disk.write()
    disk.spool.close()  # directories closed: the next batch opens them again
    disk.tmp.rmdir()
    disk.tmp.write_bytes(b"a file where a directory should be")
    ops = disk.commit(
        Op(OpKind.WRITE, new_id(NOW), env=b"x", meta=Meta(NOW)), Op(OpKind.REMOVE, id)
    )
    for op in ops:
        assert isinstance(op.error, QueueError)
        assert "unusable" in str(op.error)
    assert disk.names(disk.env) == {f"{id}.env"}
