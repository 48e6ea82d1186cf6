"""JournalStorage on real files: layout, one flush per append, segments, damage, failures."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpq.envelope import Envelope
from smtpq.errors import MessageGone, QueueError
from smtpq.storage import JournalStorage
from smtpq.storage.journal.records import SEGMENT_HEADER
from tests.integration import fsize_child

NOW = 1_800_000_000.0


def make_envelope(n: int = 0, size: int = 200) -> Envelope:
    env = Envelope(f"s{n}@example.org", ["a@example.com", "b@example.com"])
    env.parse(b"Subject: journal %d\r\n\r\n" % n + b"x" * size)
    return env


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.log"))


def corrupt_files(path: Path) -> set[str]:
    corrupt = path / "corrupt"
    return {p.name for p in corrupt.iterdir()} if corrupt.exists() else set()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[JournalStorage]:
    s = JournalStorage(path)
    yield s
    await s.close()


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (at most 10 s) for background work that ``check`` sees done."""
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# -- layout and flushes --------------------------------------------------------------------------


async def test_messages_go_into_one_owner_only_segment(store: JournalStorage, path: Path) -> None:
    first = await store.write(make_envelope(1), NOW)
    await store.write(make_envelope(2), NOW)
    (segment,) = segments(path)
    assert segment.name == "00000001.log"
    assert segment.read_bytes().startswith(SEGMENT_HEADER)
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert make_envelope(1).to_bytes() in segment.read_bytes()
    assert (await store.get(first))[0].to_bytes() == make_envelope(1).to_bytes()


class Flushes:
    """The fsync and fdatasync calls made, with the thread that made each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.threads: set[int] = set()
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)

            def spy(fd: int, _real: Any = real, _name: str = name) -> None:
                self.calls.append(_name)
                self.threads.add(threading.get_ident())
                _real(fd)

            monkeypatch.setattr(os, name, spy)


async def test_a_write_is_one_append_and_one_fdatasync(
    store: JournalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.write(make_envelope(0), NOW)  # creates the segment (its name made durable)
    flushes = Flushes(monkeypatch)
    id = await store.write(make_envelope(1), NOW)
    assert flushes.calls == ["fdatasync"]
    await store.increment_attempts(id)
    await store.set_timestamp(id, NOW + 60)
    assert flushes.calls == ["fdatasync"] * 3
    assert threading.get_ident() not in flushes.threads


async def test_concurrent_changes_share_their_appends(store: JournalStorage) -> None:
    ids = await asyncio.gather(*(store.write(make_envelope(i), NOW) for i in range(50)))
    await asyncio.gather(*(store.increment_attempts(id) for id in ids for _ in range(2)))
    info = await store.get_info()
    assert info["size"] == 50
    assert info["batched_ops"] > info["batches"]
    # Two changes of one message in one batch are one record of its state.
    assert info["batched_ops"] < 150
    assert {(await store.get(id))[1] for id in ids} == {2}


async def test_a_removal_is_written_at_once_and_flushed_with_the_next_write(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JournalStorage(path)
    a = await store.write(make_envelope(1), NOW)
    (segment,) = segments(path)
    size = segment.stat().st_size
    flushes = Flushes(monkeypatch)
    await store.remove(a)
    # In the file when remove() returns (a SIGKILL cannot undo it), without a flush of its own.
    assert segment.stat().st_size > size
    assert flushes.calls == []
    b = await store.write(make_envelope(2), NOW)
    assert flushes.calls == ["fdatasync"]  # which makes the removal durable too
    # A removal and a write that follows it soon share one append.
    batches = (await store.get_info())["batches"]
    removal = asyncio.create_task(store.remove(b))
    await asyncio.sleep(0)
    c = await store.write(make_envelope(3), NOW)
    await removal
    assert (await store.get_info())["batches"] == batches + 1
    assert flushes.calls == ["fdatasync"] * 2
    await store.close()
    again = JournalStorage(path)
    try:
        assert {id for _, id in await again.load()} == {c}
    finally:
        await again.close()


async def test_no_file_io_on_the_event_loop(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    seen: set[int] = set()
    for name in ("open", "fsync", "fdatasync", "unlink", "listdir", "pread", "write"):
        real = getattr(os, name)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.add(threading.get_ident())
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    store = JournalStorage(path, segment_size=2048)
    try:
        ids = [await store.write(make_envelope(i, 800), NOW) for i in range(10)]
        await store.increment_attempts(ids[0])
        await store.get(ids[0])
        await store.get_infos(ids)
        for id in ids[1:]:
            await store.remove(id)
    finally:
        await store.close()
    monkeypatch.undo()
    assert seen
    assert loop_thread not in seen


# -- segments: rolling, deleting, compacting -----------------------------------------------------


async def test_dead_segments_are_deleted_oldest_first(path: Path) -> None:
    store = JournalStorage(path, segment_size=4096)
    try:
        ids = [await store.write(make_envelope(i, 1000), NOW) for i in range(20)]
        assert len(segments(path)) >= 5
        for id in ids:
            await store.remove(id)
        await store.write(make_envelope(99), NOW)

        async def one_left() -> bool:
            return len(segments(path)) == 1

        await until(one_left, "every dead segment deleted")
        info = await store.get_info()
        assert info["segments"] == 1
        assert info["size"] == 1
    finally:
        await store.close()


async def test_a_long_deferred_message_does_not_keep_the_journal_growing(path: Path) -> None:
    store = JournalStorage(path, segment_size=4096)
    try:
        kept = await store.write(make_envelope(-1, 500), NOW)
        await store.increment_attempts(kept)
        await store.set_timestamp(kept, NOW + 3600)
        for round in range(10):  # 300 messages come and go behind it
            batch = range(30 * round, 30 * round + 30)
            ids = await asyncio.gather(*(store.write(make_envelope(i, 1000), NOW) for i in batch))
            await asyncio.gather(*(store.remove(id) for id in ids))
        await store.write(make_envelope(1000), NOW)

        async def compacted() -> bool:
            info = await store.get_info()
            return bool(info["compacted"]) and info["journal_bytes"] < 5 * 4096 + 4 * 1300

        await until(compacted, "the old segments compacted away")
        assert len(segments(path)) <= 6
    finally:
        await store.close()
    again = JournalStorage(path, segment_size=4096)
    try:
        entry = await again.get_entry(kept)
        assert entry.envelope.to_bytes() == make_envelope(-1, 500).to_bytes()
        assert (entry.attempts, entry.timestamp) == (1, NOW + 3600)
        assert len(await again.load()) == 2
    finally:
        await again.close()


# -- damage --------------------------------------------------------------------------------------


async def written(path: Path, count: int) -> list[str]:
    store = JournalStorage(path)
    try:
        return [await store.write(make_envelope(i), NOW) for i in range(count)]
    finally:
        await store.close()


async def test_a_torn_tail_is_kept_aside_and_cut_off_once(path: Path) -> None:
    ids = await written(path, 3)
    (segment,) = segments(path)
    good = segment.stat().st_size
    torn = make_envelope(9).to_bytes()[:150]
    with segment.open("ab") as f:
        f.write(b"SJW\x00\x00\x10\x00" + torn)  # an append cut short by a crash
    store = JournalStorage(path)
    try:
        assert {id for _, id in await store.load()} == set(ids)
        info = await store.get_info()
        assert info["torn_tails"] == 1
        assert info["corrupt"] == 0
        assert segment.stat().st_size == good
        assert corrupt_files(path) == {f"{segment.name}.{good}-{good + 7 + len(torn)}"}
        await store.write(make_envelope(4), NOW)
    finally:
        await store.close()
    again = JournalStorage(path)
    try:
        assert len(await again.load()) == 4
        assert (await again.get_info())["torn_tails"] == 0
    finally:
        await again.close()


async def test_a_damaged_record_loses_only_its_message_and_is_kept(path: Path) -> None:
    ids = await written(path, 3)
    (segment,) = segments(path)
    data = bytearray(segment.read_bytes())
    second = data.find(b"journal 1\r\n")  # inside the second message's record
    data[second] ^= 0x20
    segment.write_bytes(bytes(data))
    for _ in range(2):  # kept once, whatever the number of restarts
        store = JournalStorage(path)
        try:
            assert {id for _, id in await store.load()} == {ids[0], ids[2]}
            assert (await store.get_info())["corrupt"] == 1
            assert len(corrupt_files(path)) == 1
            assert (await store.get(ids[2]))[0].to_bytes() == make_envelope(2).to_bytes()
        finally:
            await store.close()


async def test_an_envelope_damaged_after_the_start_is_quarantined_when_read(
    store: JournalStorage, path: Path
) -> None:
    id = await store.write(make_envelope(1), NOW)
    (segment,) = segments(path)
    data = bytearray(segment.read_bytes())
    data[data.find(b"x" * 50)] ^= 0x01
    segment.write_bytes(bytes(data))
    with pytest.raises(MessageGone):
        await store.get_entry(id)
    assert corrupt_files(path) == {f"{id}.env"}
    assert await store.load() == []
    assert (await store.get_info())["corrupt"] == 1


async def test_a_segment_of_another_format_is_moved_aside(path: Path) -> None:
    ids = await written(path, 2)
    path.joinpath("00000007.log").write_bytes(b"not a journal at all\n")
    path.joinpath("00000008.log").write_bytes(SEGMENT_HEADER[:5])  # created, never written
    store = JournalStorage(path)
    try:
        assert {id for _, id in await store.load()} == set(ids)
        assert (await store.get_info())["corrupt"] == 1
        assert corrupt_files(path) == {"00000007.log"}
        await store.write(make_envelope(3), NOW)
        assert [p.name for p in segments(path)] == ["00000001.log", "00000002.log"]
    finally:
        await store.close()


async def test_a_reader_beside_the_owner_repairs_nothing(path: Path) -> None:
    ids = await written(path, 3)
    (segment,) = segments(path)
    # What a running owner may have on disk at any moment: an append under way at the end of
    # its segment, and a segment it is creating, its header not written yet.
    with segment.open("ab") as f:
        f.write(b"SJW\x00\x00\x10\x00" + b"half a record")
    before = segment.read_bytes()
    creating = path / "00000002.log"
    creating.write_bytes(SEGMENT_HEADER[:4])
    reader = JournalStorage(path, read_only=True)
    try:
        assert {id for _, id in await reader.load()} == set(ids)
        assert [i.id for i in await reader.get_infos(ids)] == ids
        assert (await reader.get(ids[1]))[0].to_bytes() == make_envelope(1).to_bytes()
        with pytest.raises(QueueError, match="reading only"):
            await reader.write(make_envelope(4), NOW)
        with pytest.raises(QueueError, match="reading only"):
            await reader.remove(ids[0])
    finally:
        await reader.close()
    assert segment.read_bytes() == before
    assert creating.read_bytes() == SEGMENT_HEADER[:4]
    assert corrupt_files(path) == set()


async def test_a_reader_of_no_journal_creates_none(tmp_path: Path) -> None:
    reader = JournalStorage(tmp_path / "none", read_only=True)
    try:
        assert await reader.load() == []
    finally:
        await reader.close()
    assert not (tmp_path / "none").exists()


# -- failures ------------------------------------------------------------------------------------


async def test_a_failed_append_fails_its_writes_and_leaves_nothing(path: Path) -> None:
    result = await fsize_child.run("journal", str(path))
    message, code, esc = result["error"]
    assert "too large" in message.lower()
    assert (code, esc) == ("451", "4.3.0")
    store = JournalStorage(path)
    try:
        assert {id for _, id in await store.load()} == set(result["written"])
        info = await store.get_info()
        assert (info["torn_tails"], info["corrupt"]) == (0, 0)
    finally:
        await store.close()


async def test_a_closed_journal_refuses_writes(store: JournalStorage) -> None:
    await store.close()
    with pytest.raises(Exception, match="closed"):
        await store.write(make_envelope(), NOW)
