"""Reading a disk queue's messages: whole entries, listing records, ids, reading ahead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpq.errors import MessageGone
from smtpq.reply import Reply
from smtpq.storage.disk import reader
from smtpq.storage.disk.meta import CorruptError
from smtpq.storage.schedule import id_key
from tests.unit.disk_files import NOW, DiskFiles, envelope


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskFiles]:
    with DiskFiles(tmp_path) as files:
        yield files


def test_an_entry_keeps_the_pending_recipients_and_their_indexes(disk: DiskFiles) -> None:
    id = disk.write(rcpts=3)
    disk.update(id, delivered=[1], attempts=2, last_reply=Reply("451", "4.7.1 later").to_dict())
    entry = reader.read_entry(disk.spool, id)
    assert entry.envelope.recipients == ["r0@example.com", "r2@example.com"]
    assert (entry.pending, entry.attempts, entry.timestamp) == ((0, 2), 2, NOW)
    assert entry.original_recipients == tuple(envelope(0, 3).recipients)
    assert entry.last_reply == Reply("451", "4.7.1 later")


def test_a_damaged_envelope_is_corrupt_and_a_missing_one_gone(disk: DiskFiles) -> None:
    damaged, missing = disk.write(1), disk.write(2)
    path = disk.env / f"{damaged}.env"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptError):
        reader.read_entry(disk.spool, damaged)
    (disk.env / f"{missing}.env").unlink()
    with pytest.raises(MessageGone):
        reader.read_entry(disk.spool, missing)


def test_listings_come_in_order_without_what_is_gone_or_damaged(
    disk: DiskFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "INFO_AHEAD", 1)
    ids = [disk.write(n, rcpts=2) for n in range(5)]
    disk.update(ids[0], delivered=[0], held=True)
    (disk.meta / f"{ids[1]}.meta").unlink()
    (disk.env / f"{ids[2]}.env").write_bytes(b"junk")
    infos = reader.read_infos(disk.spool, ids)
    assert [i.id for i in infos] == [ids[0], ids[3], ids[4]]
    assert (infos[0].recipients, infos[0].held) == (("r1@example.com",), True)
    assert infos[1].size == len(envelope(3))


def test_ids_are_listed_sorted_from_the_names_alone(disk: DiskFiles) -> None:
    ids = [disk.write(n, NOW - n) for n in range(4)]  # written newest first
    (disk.meta / "README").write_text("not a message")
    assert reader.meta_keys(disk.spool) == sorted(id_key(id) for id in ids)


def test_reading_ahead_is_only_a_hint(disk: DiskFiles) -> None:
    id = disk.write()
    reader.read_ahead(disk.spool, [id, "0" * 32])  # one of them is not stored: no error
    disk.spool.close()
    reader.read_ahead(disk.spool, [id])  # opens the directories again, if it must
