"""The load scan of a disk queue (scan_spool): schedules found, crash leftovers resolved."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpq.errors import QueueError
from smtpq.storage.disk.scan import scan_spool
from smtpq.storage.disk.spool import Spool
from smtpq.storage.schedule import id_key
from tests.unit.disk_files import NOW, DiskFiles


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskFiles]:
    with DiskFiles(tmp_path) as files:
        yield files


def test_scan_finds_every_message_with_its_time_and_hold(disk: DiskFiles) -> None:
    ids = [disk.write(n, NOW + n) for n in range(3)]
    disk.update(ids[1], held=True)
    result = scan_spool(disk.spool, (), lambda: False)
    assert result.found == {id_key(id): NOW + n for n, id in enumerate(ids)}
    assert result.held == {id_key(ids[1])}
    assert (result.orphans, result.scratch, result.corrupt) == (0, 0, 0)


def test_scan_resolves_what_a_crash_left_by_the_existence_rule(disk: DiskFiles) -> None:
    kept, env_only, meta_only, busy = (disk.write(n) for n in range(4))
    for id in (env_only, busy):  # a write or a removal cut short: an envelope alone
        (disk.meta / f"{id}.meta").unlink()
    (disk.env / f"{meta_only}.env").unlink()  # its envelope lost: not a message
    dead = Spool(*map(str, (disk.env, disk.meta, disk.tmp, disk.corrupt)), durable=True)
    for name in (dead.scratch_name(), disk.spool.scratch_name(), "notes.txt"):
        (disk.tmp / name).write_bytes(b"half")
    result = scan_spool(disk.spool, {busy}, lambda: False)  # busy: its write is in flight
    assert set(result.found) == {id_key(kept)}
    assert (result.orphans, result.scratch, result.corrupt) == (1, 1, 1)
    assert disk.names(disk.env) == {f"{kept}.env", f"{busy}.env"}
    assert disk.names(disk.corrupt) == {f"{meta_only}.meta"}
    assert len(disk.names(disk.tmp)) == 2  # this spool's own scratch file, and the notes


def test_bad_metas_are_quarantined_and_the_scan_goes_on(disk: DiskFiles) -> None:
    good, bad, link = (disk.write(n) for n in range(3))
    (disk.meta / f"{bad}.meta").write_bytes(b"smtpq-meta 1 00000000\n{}\n")
    (disk.meta / f"{link}.meta").unlink()
    os.symlink(disk.meta / f"{good}.meta", disk.meta / f"{link}.meta")
    result = scan_spool(disk.spool, (), lambda: False)
    assert (set(result.found), result.corrupt) == ({id_key(good)}, 2)
    assert disk.spool.corrupt_stored == 2


def test_a_closing_storage_stops_the_scan(disk: DiskFiles) -> None:
    disk.write()
    with pytest.raises(QueueError, match="closed"):
        scan_spool(disk.spool, (), lambda: True)
