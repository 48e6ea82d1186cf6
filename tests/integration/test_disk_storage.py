"""DiskStorage on real files: layout, format, recovery, failures, group commit."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpq.envelope import Envelope
from smtpq.errors import MessageGone, QueueError
from smtpq.reply import Reply
from smtpq.storage import DiskStorage
from smtpq.storage.disk import committer, libc, reader, scan, sync
from tests.integration import fsize_child

NOW = 1_800_000_000.0


def make_envelope(n: int = 0, size: int = 200, rcpts: int = 2) -> Envelope:
    env = Envelope(f"s{n}@example.org", [f"r{i}@example.com" for i in range(rcpts)])
    env.parse(b"Subject: disk %d\r\n\r\n" % n + b"x" * size)
    return env


class Dirs:
    """The directories of one disk queue under a test's tmp_path."""

    def __init__(self, root: Path) -> None:
        self.env = root / "env"
        self.meta = root / "meta"
        self.tmp = self.meta / "tmp"
        self.corrupt = self.meta / "corrupt"

    def open(self, **kwargs: Any) -> DiskStorage:
        return DiskStorage(self.env, self.meta, **kwargs)

    def names(self, which: Path) -> set[str]:
        return {p.name for p in which.iterdir()} if which.exists() else set()

    def ids(self, which: Path, suffix: str) -> set[str]:
        return {n[: -len(suffix)] for n in self.names(which) if n.endswith(suffix)}


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return Dirs(tmp_path)


@pytest.fixture
async def store(dirs: Dirs) -> AsyncIterator[DiskStorage]:
    s = dirs.open()
    yield s
    await s.close()


# -- layout and format ---------------------------------------------------------------------------


async def test_write_creates_two_owner_only_files(store: DiskStorage, dirs: Dirs) -> None:
    env = make_envelope()
    id = await store.write(env, NOW)
    env_file, meta_file = dirs.env / f"{id}.env", dirs.meta / f"{id}.meta"
    assert env_file.read_bytes() == env.to_bytes()
    for path in (env_file, meta_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for path in (dirs.env, dirs.meta, dirs.tmp, dirs.corrupt):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert dirs.names(dirs.tmp) == set()


async def test_meta_file_is_versioned_checksummed_json(store: DiskStorage, dirs: Dirs) -> None:
    id = await store.write(make_envelope(), NOW)
    await store.set_recipients_delivered(id, [1])
    await store.set_timestamp(id, NOW + 60, last_reply=Reply("451", "4.7.1 later"))
    head, body, end = (dirs.meta / f"{id}.meta").read_bytes().split(b"\n")
    magic, version, crc = head.split(b" ")
    assert (magic, version, end) == (b"smtpq-meta", b"1", b"")
    assert int(crc, 16) == zlib.crc32(body)
    fields = json.loads(body)
    assert fields["timestamp"] == NOW + 60
    assert fields["attempts"] == 0
    assert fields["delivered"] == [1]
    assert fields["held"] is False
    assert fields["last_reply"]["code"] == "451"


async def test_remove_deletes_both_files(store: DiskStorage, dirs: Dirs) -> None:
    id = await store.write(make_envelope(), NOW)
    await store.remove(id)
    assert dirs.ids(dirs.env, ".env") == set()
    assert dirs.ids(dirs.meta, ".meta") == set()


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcde",
        "0123456789abcdef0123456789abcdef/",
        "../meta/0123456789abcdef0123456789",
        "",
    ],
)
async def test_foreign_ids_are_gone(store: DiskStorage, bad: str) -> None:
    await store.write(make_envelope(), NOW)
    calls: list[Callable[[], Any]] = [
        lambda: store.get(bad),
        lambda: store.get_entry(bad),
        lambda: store.remove(bad),
        lambda: store.set_timestamp(bad, NOW),
        lambda: store.increment_attempts(bad),
        lambda: store.set_recipients_delivered(bad, [0]),
        lambda: store.set_held(bad, True),
    ]
    for call in calls:
        with pytest.raises(MessageGone):
            await call()


async def test_updates_of_a_missing_message_are_gone(store: DiskStorage) -> None:
    id = await store.write(make_envelope(), NOW)
    await store.remove(id)
    with pytest.raises(MessageGone):
        await store.increment_attempts(id)
    with pytest.raises(MessageGone):
        await store.set_timestamp(id, NOW)
    with pytest.raises(MessageGone):
        await store.set_held(id, True)


async def test_tmp_dir_on_another_filesystem_is_refused(dirs: Dirs, small_fs: Path) -> None:
    store = DiskStorage(dirs.env, dirs.meta, small_fs / "tmp")
    try:
        with pytest.raises(QueueError, match="one filesystem"):
            await store.write(make_envelope(), NOW)
    finally:
        await store.close()


# -- load: recovery ------------------------------------------------------------------------------


async def test_held_message_stays_held_after_restart(store: DiskStorage, dirs: Dirs) -> None:
    held = await store.write(make_envelope(), NOW)
    free = await store.write(make_envelope(), NOW)
    await store.set_held(held, True)
    await store.close()
    again = dirs.open()
    try:
        assert {i for _, i in await again.load()} == {held, free}
        assert await again.claim(NOW + 3600, 10) == [free]
        assert (await again.get_entry(held)).held
    finally:
        await again.close()


def corrupt_metas() -> dict[str, bytes]:
    """Bad meta contents, by what is wrong with them."""
    body = b'{"timestamp":1.0,"attempts":0,"delivered":[],"held":false,"last_reply":null}'
    head = b"smtpq-meta 1 %08x\n" % zlib.crc32(body)
    return {
        "empty": b"",
        "truncated": (head + body + b"\n")[:-10],
        "garbage": b"\x00\xff" * 40,
        "pickle": b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94.",
        "wrong version": b"smtpq-meta 2 %08x\n" % zlib.crc32(body) + body + b"\n",
        "bad checksum": b"smtpq-meta 1 00000000\n" + body + b"\n",
        "bad json": b"smtpq-meta 1 %08x\n{]\n" % zlib.crc32(b"{]"),
        "wrong types": (
            b"smtpq-meta 1 %08x\n" % zlib.crc32(b'{"timestamp":"x"}') + b'{"timestamp":"x"}\n'
        ),
    }


async def test_load_quarantines_every_bad_meta_and_keeps_going(dirs: Dirs) -> None:
    store = dirs.open()
    good = [await store.write(make_envelope(i), NOW + i) for i in range(5)]
    bad = {}
    for reason, content in corrupt_metas().items():
        id = await store.write(make_envelope(), NOW)
        (dirs.meta / f"{id}.meta").write_bytes(content)
        bad[id] = reason
    await store.close()

    again = dirs.open()
    try:
        loaded = await again.load()
        assert sorted(loaded) == [(NOW + i, id) for i, id in enumerate(good)]
        info = await again.get_info()
        assert info["size"] == len(good)
        assert info["corrupt"] == len(bad)
        assert info["corrupt_stored"] == len(bad)
        # Both files of each bad entry are kept for the administrator, none is left in place.
        assert dirs.names(dirs.corrupt) == {f"{id}{s}" for id in bad for s in (".meta", ".env")}
        assert dirs.ids(dirs.meta, ".meta") == set(good)
        assert dirs.ids(dirs.env, ".env") == set(good)
        for id in good:
            assert (await again.get(id))[0].sender.startswith("s")
    finally:
        await again.close()
    # A second restart skips the corrupt directory and counts what is in it.
    third = dirs.open()
    try:
        assert len(await third.load()) == len(good)
        info = await third.get_info()
        assert (info["corrupt"], info["corrupt_stored"]) == (0, len(bad))
    finally:
        await third.close()


async def test_load_resolves_orphans_by_the_existence_rule(store: DiskStorage, dirs: Dirs) -> None:
    kept = await store.write(make_envelope(1), NOW)
    env_only = await store.write(make_envelope(2), NOW)
    meta_only = await store.write(make_envelope(3), NOW)
    (dirs.meta / f"{env_only}.meta").unlink()  # a write or a removal cut short
    (dirs.env / f"{meta_only}.env").unlink()  # an envelope lost: an inconsistent entry
    loaded = await store.load()
    assert [i for _, i in loaded] == [kept]
    assert dirs.ids(dirs.env, ".env") == {kept}
    assert dirs.names(dirs.corrupt) == {f"{meta_only}.meta"}
    info = await store.get_info()
    assert (info["orphans_removed"], info["corrupt"], info["size"]) == (1, 1, 1)
    with pytest.raises(MessageGone):
        await store.get(env_only)


async def test_load_removes_only_its_own_scratch_leftovers(store: DiskStorage, dirs: Dirs) -> None:
    await store.write(make_envelope(), NOW)
    leftovers = ["deadbeef.1.tmp", "deadbeef.2a.tmp"]  # a dead storage object's scratch files
    foreign = ["notes.txt", "0123456789abcdef0123456789abcdef.env", "x.1.tmp", "deadbeef.tmp"]
    for name in leftovers + foreign:
        (dirs.tmp / name).write_bytes(b"half")
    # Files that are not the storage's own are left alone in the queue directories too.
    (dirs.meta / "README").write_text("admin notes")
    await store.load()
    assert dirs.names(dirs.tmp) == set(foreign)
    assert (dirs.meta / "README").exists()
    assert (await store.get_info())["scratch_removed"] == 2


async def test_symlinked_meta_is_quarantined_not_followed(store: DiskStorage, dirs: Dirs) -> None:
    id = await store.write(make_envelope(), NOW)
    secret = dirs.meta.parent / "secret"
    secret.write_bytes(b"not for the queue")
    meta = dirs.meta / f"{id}.meta"
    meta.unlink()
    meta.symlink_to(secret)
    assert await store.load() == []
    assert secret.read_bytes() == b"not for the queue"
    assert (await store.get_info())["corrupt"] == 1


async def test_corrupt_envelope_is_quarantined_when_read(store: DiskStorage, dirs: Dirs) -> None:
    id = await store.write(make_envelope(), NOW)
    other = await store.write(make_envelope(), NOW)
    path = dirs.env / f"{id}.env"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(MessageGone):
        await store.get(id)
    assert dirs.names(dirs.corrupt) == {f"{id}.meta", f"{id}.env"}
    assert await store.claim(NOW, 10) == [other]
    info = await store.get_info()
    assert (info["size"], info["corrupt"]) == (1, 1)


async def test_update_of_corrupt_meta_quarantines_it(store: DiskStorage, dirs: Dirs) -> None:
    id = await store.write(make_envelope(), NOW)
    (dirs.meta / f"{id}.meta").write_bytes(b"smtpq-meta 1 00000000\n{}\n")
    with pytest.raises(MessageGone):
        await store.increment_attempts(id)
    assert f"{id}.meta" in dirs.names(dirs.corrupt)
    assert (await store.get_info())["size"] == 0


async def test_reload_keeps_leases_and_sees_new_files(store: DiskStorage, dirs: Dirs) -> None:
    leased = await store.write(make_envelope(), NOW, claimed=True)
    other = dirs.open()
    try:
        foreign = await other.write(make_envelope(), NOW)
    finally:
        await other.close()
    assert sorted(i for _, i in await store.load()) == sorted([leased, foreign])
    assert await store.claim(NOW, 10) == [foreign]  # the lease survived the reload


async def test_load_while_writing_and_removing_loses_nothing(dirs: Dirs) -> None:
    store = dirs.open()
    try:
        early = [await store.write(make_envelope(i), NOW) for i in range(200)]
        await store.close()
        store = dirs.open()

        async def churn() -> tuple[list[str], list[str]]:
            written = []
            for i in range(100):
                written.append(await store.write(make_envelope(i), NOW + 1))
            for id in early[:100]:
                await store.remove(id)
            return written, early[:100]

        tasks = [asyncio.create_task(churn()) for _ in range(3)]
        loads = [await store.load() for _ in range(3)]
        results = await asyncio.gather(*tasks)
        written = {id for w, _ in results for id in w}
        removed = set(early[:100])
        assert all(loaded for loaded in loads)
        expected = written | set(early[100:])
        assert {i for _, i in await store.load()} == expected
        # The in-memory schedule matched the disk even without that last load.
        assert sorted(await store.claim(NOW + 10, 10_000)) == sorted(expected)
        assert not removed & dirs.ids(dirs.env, ".env")
        assert (await store.get_info())["corrupt"] == 0
    finally:
        await store.close()


# -- failures: nothing half-written, 451 ---------------------------------------------------------


def assert_451(exc: QueueError) -> None:
    assert exc.reply.code == "451"
    assert exc.reply.enhanced_status_code == "4.3.0"


async def test_full_disk_fails_the_write_and_leaves_nothing(small_fs: Path) -> None:
    dirs = Dirs(small_fs)
    store = dirs.open()
    stored: list[str] = []
    try:
        error: QueueError | None = None
        for i in range(100):
            try:
                stored.append(await store.write(make_envelope(i, size=30_000), NOW))
            except QueueError as exc:
                error = exc
                break
        assert error is not None
        assert_451(error)
        assert "no space" in str(error).lower()
        assert 0 < len(stored) < 100
        # Concurrent writers all fail cleanly while the disk is full.
        results = await asyncio.gather(
            *(store.write(make_envelope(i, size=30_000), NOW) for i in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(r, QueueError) for r in results)
        assert dirs.names(dirs.tmp) == set()
        assert dirs.ids(dirs.env, ".env") == dirs.ids(dirs.meta, ".meta") == set(stored)
        # Space freed: the storage works again.
        await store.remove(stored.pop())
        stored.append(await store.write(make_envelope(7, size=1000), NOW))
    finally:
        await store.close()
    again = dirs.open()
    try:
        assert {i for _, i in await again.load()} == set(stored)
        for id in stored:
            await again.get(id)
        assert (await again.get_info())["corrupt"] == 0
    finally:
        await again.close()


async def test_file_size_limit_fails_the_write_cleanly(dirs: Dirs) -> None:
    result = await fsize_child.run("disk", str(dirs.env), str(dirs.meta))
    message, code, esc = result["error"]
    assert "too large" in message.lower()
    assert (code, esc) == ("451", "4.3.0")
    assert dirs.names(dirs.tmp) == set()
    written = set(result["written"])
    assert dirs.ids(dirs.env, ".env") == dirs.ids(dirs.meta, ".meta") == written


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Make a directory immutable (chattr +i): even root gets EPERM there."""
    made: list[Path] = []

    def make(path: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {done.stderr.decode().strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_permission_error_fails_the_write_cleanly(
    store: DiskStorage, dirs: Dirs, immutable: Callable[[Path], None]
) -> None:
    first = await store.write(make_envelope(), NOW)
    immutable(dirs.meta)  # envelopes can still be renamed in, metas cannot
    with pytest.raises(QueueError) as caught:
        await store.write(make_envelope(), NOW)
    assert_451(caught.value)
    assert "not permitted" in str(caught.value)
    assert dirs.names(dirs.tmp) == set()
    assert dirs.ids(dirs.env, ".env") == dirs.ids(dirs.meta, ".meta") == {first}
    # The message written before is untouched and still deliverable.
    assert await store.claim(NOW, 10) == [first]


async def test_meta_update_failure_keeps_the_old_meta(
    store: DiskStorage, dirs: Dirs, immutable: Callable[[Path], None]
) -> None:
    id = await store.write(make_envelope(), NOW)
    immutable(dirs.meta)
    with pytest.raises(QueueError):
        await store.increment_attempts(id)
    with pytest.raises(QueueError):
        await store.remove(id)
    entry = await store.get_entry(id)
    assert entry.attempts == 0
    assert dirs.names(dirs.tmp) == set()


async def test_removed_files_are_reused_and_overwritten(store: DiskStorage, dirs: Dirs) -> None:
    secret = make_envelope(1, size=5000)
    secret.parse(b"Subject: secret\r\n\r\nthe launch codes\r\n" + b"x" * 5000)
    old = await store.write(secret, NOW)
    inodes = {(dirs.env / f"{old}.env").stat().st_ino, (dirs.meta / f"{old}.meta").stat().st_ino}
    await store.remove(old)
    assert dirs.ids(dirs.env, ".env") == dirs.ids(dirs.meta, ".meta") == set()
    new = await store.write(make_envelope(2), NOW)
    reused = {(dirs.env / f"{new}.env").stat().st_ino, (dirs.meta / f"{new}.meta").stat().st_ino}
    assert reused == inodes  # no inode freed and allocated again
    env, _ = await store.get(new)
    assert env.to_bytes() == make_envelope(2).to_bytes()  # cut to size, nothing old after it
    for path in (*dirs.env.iterdir(), *dirs.meta.glob("*.meta"), *dirs.tmp.iterdir()):
        assert b"launch codes" not in path.read_bytes()
    await store.close()
    assert dirs.names(dirs.tmp) == set()  # a clean shutdown leaves no scratch files


async def test_meta_updates_replace_atomically_and_keep_inodes(
    store: DiskStorage, dirs: Dirs
) -> None:
    id = await store.write(make_envelope(), NOW)
    files = {p.stat().st_ino for p in (dirs.env / f"{id}.env", dirs.meta / f"{id}.meta")}
    for n in range(1, 6):
        assert await store.increment_attempts(id) == n
        files.add((dirs.meta / f"{id}.meta").stat().st_ino)
    # Each update went to a new inode, the replaced one was kept for the next update.
    assert len(files) <= 4
    assert (await store.get(id))[1] == 5


def test_sync_auto_needs_a_syncfs_that_reports_errors(dirs: Dirs) -> None:
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    expected = "auto" if sys.platform == "linux" and release >= (5, 8) else "fsync"
    assert DiskStorage(dirs.env, dirs.meta).sync == expected


class SyncSpy:
    """Records, in order, the renames into the queue directories and every sync call (which
    thread made it), while the real calls go on: how the kernel sees a commit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dirs: Dirs) -> None:
        self.dirs = dirs
        self.calls: list[tuple[str, str]] = []  # (call, what: env, meta, tmp or file)
        self.threads: list[int] = []
        self._roles: dict[int, str] = {}
        real_rename, real_fsync, real_fdatasync = os.rename, os.fsync, os.fdatasync

        def rename(*args: Any, **kwargs: Any) -> None:
            real_rename(*args, **kwargs)
            self._note("rename", kwargs.get("dst_dir_fd"))

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self._note("fsync", fd)

        def fdatasync(fd: int) -> None:
            real_fdatasync(fd)
            self._note("fdatasync", fd)

        def syncfs_function() -> Callable[[int], None] | None:
            inner = libc.syncfs_function()
            if inner is None:
                return None

            def syncfs(fd: int) -> None:
                inner(fd)
                self._note("syncfs", fd)

            return syncfs

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(sync, "syncfs_function", syncfs_function)

    def start(self) -> None:
        """Forget what was recorded; from now on, tell the queue directories by their inodes."""
        self._roles = {
            self.dirs.env.stat().st_ino: "env",
            self.dirs.meta.stat().st_ino: "meta",
            self.dirs.tmp.stat().st_ino: "tmp",
        }
        self.calls.clear()
        self.threads.clear()

    def _note(self, call: str, fd: int | None) -> None:
        if self._roles:
            what = "file" if fd is None else self._roles.get(os.fstat(fd).st_ino, "file")
            self.calls.append((call, what))
            self.threads.append(threading.get_ident())

    def syncs(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "rename"]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch, dirs: Dirs) -> SyncSpy:
    return SyncSpy(monkeypatch, dirs)


async def opened(dirs: Dirs, spy: SyncSpy, sync: str) -> DiskStorage:
    store = dirs.open(sync=sync)
    if store.sync != sync:
        await store.close()
        pytest.skip("no syncfs that reports errors here")
    await store.load()  # creates the directories
    spy.start()
    return store


async def test_a_lone_write_by_syncfs_makes_two_sync_calls(dirs: Dirs, spy: SyncSpy) -> None:
    store = await opened(dirs, spy, "syncfs")
    try:
        await store.write(make_envelope(), NOW)
        # Wave 1 makes both new files and the envelope's name durable, then the meta is put
        # in place; wave 2 makes its name durable. The meta never names a file not durable.
        assert spy.calls == [
            ("rename", "env"),
            ("syncfs", "tmp"),
            ("rename", "meta"),
            ("fsync", "meta"),
        ]
    finally:
        await store.close()


async def test_a_lone_write_by_fsync_makes_one_wave_of_three_then_one(
    dirs: Dirs, spy: SyncSpy
) -> None:
    store = await opened(dirs, spy, "fsync")
    try:
        await store.write(make_envelope(), NOW)
        assert spy.calls[0] == ("rename", "env")
        wave1 = spy.calls[1:4]
        assert sorted(wave1) == [("fdatasync", "file"), ("fdatasync", "file"), ("fsync", "env")]
        assert len(set(spy.threads[1:4])) > 1  # at once, not one after the other
        assert spy.calls[4:] == [("rename", "meta"), ("fsync", "meta")]
    finally:
        await store.close()


async def test_auto_flushes_a_lone_write_in_two_waves_either_way(dirs: Dirs, spy: SyncSpy) -> None:
    store = await opened(dirs, spy, "auto")
    by_syncfs = [("rename", "env"), ("syncfs", "tmp"), ("rename", "meta"), ("fsync", "meta")]
    try:
        for i in range(20):
            spy.calls.clear()
            await store.write(make_envelope(i), NOW)
            if spy.calls != by_syncfs:
                assert spy.calls[0] == ("rename", "env")
                assert sorted(spy.syncs()) == [
                    ("fdatasync", "file"),
                    ("fdatasync", "file"),
                    ("fsync", "env"),
                    ("fsync", "meta"),
                ]
                assert spy.calls[-2:] == [("rename", "meta"), ("fsync", "meta")]
        # A batch of 50 writes, a size class not tried yet: one syncfs, then meta_dir.
        spy.calls.clear()
        await asyncio.gather(*(store.write(make_envelope(i), NOW) for i in range(50)))
        assert spy.syncs() == [("syncfs", "tmp"), ("fsync", "meta")]
    finally:
        await store.close()


# -- concurrency: group commit, off the loop -----------------------------------------------------


async def test_removals_wait_for_the_next_write_to_share_its_commit(
    store: DiskStorage, dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(committer, "REMOVE_LINGER", 60.0)  # longer than the test
    first = await store.write(make_envelope(1), NOW)
    before = (await store.get_info())["batches"]
    removal = asyncio.ensure_future(store.remove(first))
    await asyncio.sleep(0.05)  # the removal is submitted, alone, and not committed yet
    assert not removal.done()
    second = await store.write(make_envelope(2), NOW)
    await removal
    assert (await store.get_info())["batches"] == before + 1  # one commit for both
    assert dirs.ids(dirs.meta, ".meta") == dirs.ids(dirs.env, ".env") == {second}
    # A removal submitted while a batch is being committed waits for the next write too. The
    # commit is held in its first rename, so that the removal comes while it runs.
    inside, go = threading.Event(), threading.Event()
    real_rename = os.rename

    def rename(*args: Any, **kwargs: Any) -> None:
        inside.set()
        go.wait(30)
        real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    third = asyncio.ensure_future(store.write(make_envelope(3), NOW))
    assert await asyncio.get_running_loop().run_in_executor(None, inside.wait, 30)
    removal = asyncio.ensure_future(store.remove(second))
    await asyncio.sleep(0.01)
    go.set()
    await third
    await asyncio.sleep(0.05)
    assert not removal.done()  # not committed alone: it waits for company
    fourth = await store.write(make_envelope(4), NOW)
    await removal
    assert (await store.get_info())["batches"] == before + 3  # the third; the removal + fourth
    assert dirs.ids(dirs.meta, ".meta") == dirs.ids(dirs.env, ".env") == {third.result(), fourth}


async def test_a_lone_removal_is_committed_and_close_commits_a_waiting_one(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = dirs.open()
    one, two = [await store.write(make_envelope(i), NOW) for i in range(2)]
    await store.remove(one)  # nothing else comes: it goes on its own, after the short wait
    assert dirs.ids(dirs.meta, ".meta") == {two}
    monkeypatch.setattr(committer, "REMOVE_LINGER", 60.0)
    waiting = asyncio.ensure_future(store.remove(two))
    await asyncio.sleep(0)
    await store.close()  # does not leave the waiting removal behind
    await waiting
    assert dirs.ids(dirs.meta, ".meta") == set()
    assert dirs.ids(dirs.env, ".env") == set()


async def test_concurrent_writes_share_batches(store: DiskStorage) -> None:
    ids = await asyncio.gather(*(store.write(make_envelope(i), NOW) for i in range(200)))
    assert len(set(ids)) == 200
    info = await store.get_info()
    assert info["batched_ops"] == 200
    assert info["batches"] < 50  # flushes were shared
    for i, id in enumerate(ids):
        assert (await store.get(id))[0].sender == f"s{i}@example.org"


async def test_mixed_concurrent_operations_on_one_message(store: DiskStorage) -> None:
    id = await store.write(make_envelope(rcpts=4), NOW)
    counts = await asyncio.gather(*(store.increment_attempts(id) for _ in range(20)))
    assert sorted(counts) == list(range(1, 21))
    await asyncio.gather(
        store.set_recipients_delivered(id, [0]),
        store.set_recipients_delivered(id, [2]),
        store.set_held(id, True),
    )
    entry = await store.get_entry(id)
    assert (entry.attempts, entry.pending, entry.held) == (20, (1, 3), True)


async def test_no_file_io_on_the_event_loop(
    store: DiskStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    seen: set[int] = set()
    for name in ("open", "fsync", "rename", "unlink", "scandir", "read", "write"):
        real = getattr(os, name)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.add(threading.get_ident())
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    id = await store.write(make_envelope(), NOW)
    await store.increment_attempts(id)
    await store.load()
    await store.get(id)
    await store.remove(id)
    monkeypatch.undo()
    assert seen
    assert loop_thread not in seen


async def test_cancelled_write_leaves_a_whole_message_or_none(
    store: DiskStorage, dirs: Dirs
) -> None:
    tasks = [asyncio.create_task(store.write(make_envelope(i), NOW)) for i in range(20)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await store.close()
    again = dirs.open()
    try:
        loaded = {i for _, i in await again.load()}
        assert {t.result() for t in tasks if not t.cancelled()} <= loaded
        for id in loaded:
            await again.get(id)
        assert dirs.names(dirs.tmp) == set()
    finally:
        await again.close()


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "none"])
async def test_other_sync_modes_store_the_same(dirs: Dirs, sync: Any) -> None:
    store = dirs.open(sync=sync)
    try:
        ids = await asyncio.gather(*(store.write(make_envelope(i), NOW) for i in range(20)))
        await store.increment_attempts(ids[0])
        await store.remove(ids[1])
        assert store.sync == sync
    finally:
        await store.close()
    again = dirs.open()
    try:
        assert {i for _, i in await again.load()} == set(ids) - {ids[1]}
        assert (await again.get(ids[0]))[1] == 1
    finally:
        await again.close()


def test_unknown_sync_mode_is_refused(dirs: Dirs) -> None:
    with pytest.raises(ValueError, match="sync"):
        DiskStorage(dirs.env, dirs.meta, sync="sometimes")  # type: ignore[arg-type]


async def test_closed_storage_refuses_writes(store: DiskStorage) -> None:
    await store.close()
    with pytest.raises(QueueError):
        await store.write(make_envelope(), NOW)


# -- scale: load and listing ---------------------------------------------------------------------


def _open_fds() -> int | None:
    """How many files this process has open (None where the system does not tell)."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


@pytest.mark.parametrize("ahead", [0, 1, 4, 100])
async def test_load_reading_ahead_finds_every_entry_once(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch, ahead: int
) -> None:
    monkeypatch.setattr(scan, "SCAN_AHEAD", ahead)  # files opened before the one read
    store = dirs.open(sync="none")
    ids = [await store.write(make_envelope(i), NOW + i) for i in range(30)]
    for id in ids[::7]:
        await store.set_held(id, True)
    (dirs.meta / f"{ids[3]}.meta").write_bytes(b"smtpq-meta 1 00000000\n{}\n")
    (dirs.env / f"{ids[4]}.env").unlink()
    for bad in (ids[10], ids[11]):  # neither a file to read: a directory, a symlink
        (dirs.meta / f"{bad}.meta").unlink()
    (dirs.meta / f"{ids[10]}.meta").mkdir()
    (dirs.meta / f"{ids[11]}.meta").symlink_to(dirs.meta / f"{ids[12]}.meta")
    await store.close()
    again = dirs.open()
    fds = _open_fds()
    try:
        loaded = await again.load()
        good = [id for id in ids if id not in (ids[3], ids[4], ids[10], ids[11])]
        assert sorted(loaded) == sorted((NOW + ids.index(id), id) for id in good)
        info = await again.get_info()
        assert (info["size"], info["held"], info["corrupt"]) == (len(good), 5, 4)
        if fds is not None:  # every file read ahead is closed (4 directories stay open)
            assert (_open_fds() or 0) <= fds + 4
        assert sorted(await again.claim(NOW + 100, 100)) == [i for i in good if i not in ids[::7]]
    finally:
        await again.close()


async def test_first_uses_at_once_load_the_queue_once(
    store: DiskStorage, dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [await store.write(make_envelope(i), NOW) for i in range(3)]
    again = dirs.open()

    def scans() -> int:  # each scan logs what it loaded, once
        return sum(r.getMessage().startswith("loaded ") for r in caplog.records)

    caplog.set_level("INFO", logger=scan.__name__)
    try:
        claimed, _, info, flushed = await asyncio.gather(
            again.claim(NOW, 10), again.next_due(), again.get_info(), again.flush(NOW)
        )
        assert scans() == 1
        assert (sorted(claimed), info["size"]) == (sorted(ids), 3)
        assert flushed in (0, 3)  # before or after the claim
        await again.load()  # an explicit load always scans again
        assert scans() == 2
    finally:
        await again.close()


async def test_listing_reads_the_envelope_metadata_not_the_message(
    store: DiskStorage, dirs: Dirs
) -> None:
    many = make_envelope(1, size=300_000, rcpts=300)  # metadata larger than the first read
    many.timestamp = NOW - 60
    id = await store.write(many, NOW)
    other = await store.write(make_envelope(2), NOW)
    # Damage the end of the message: a listing never reads it, an attempt finds it out.
    path = dirs.env / f"{id}.env"
    data = path.read_bytes()
    path.write_bytes(data[:-100] + b"!" + data[-99:])
    [info, second] = await store.get_infos([id, other])
    assert (info.id, info.size, info.arrival) == (id, len(many), NOW - 60)
    assert info.recipients == tuple(many.recipients)
    assert second.sender == "s2@example.org"
    with pytest.raises(MessageGone):
        await store.get_entry(id)
    assert await store.get_infos([id, other]) == [second]  # quarantined meanwhile


async def test_listing_reads_ahead_and_skips_what_is_gone(
    store: DiskStorage, dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "INFO_AHEAD", 2)  # messages opened before the one read
    ids = [await store.write(make_envelope(i), NOW + i) for i in range(12)]
    (dirs.meta / f"{ids[1]}.meta").unlink()  # gone, as a removal leaves it half-way
    (dirs.env / f"{ids[5]}.env").unlink()  # gone, as a write leaves it half-way
    (dirs.meta / f"{ids[8]}.meta").unlink()
    (dirs.meta / f"{ids[8]}.meta").symlink_to(dirs.meta / f"{ids[9]}.meta")
    fds = _open_fds()
    infos = await store.get_infos([*ids, "not-an-id"])
    assert [i.id for i in infos] == [id for n, id in enumerate(ids) if n not in (1, 5, 8)]
    assert [i.timestamp for i in infos] == [NOW + n for n in range(12) if n not in (1, 5, 8)]
    assert (_open_fds() or 0) <= (fds or 0)  # every file opened ahead is closed


async def test_claiming_several_reads_them_ahead_and_leaves_no_file_open(dirs: Dirs) -> None:
    fds = _open_fds()
    store = dirs.open(sync="none")
    try:
        ids = [await store.write(make_envelope(i), NOW) for i in range(6)]
        assert (await store.get_info())["size"] == 6
        (dirs.env / f"{ids[2]}.env").unlink()  # gone behind the storage's back
        assert sorted(await store.claim(NOW, 10)) == sorted(ids)
        entry = await store.get_entry(ids[0])
        assert entry.envelope.sender == "s0@example.org"
        with pytest.raises(MessageGone):
            await store.get_entry(ids[2])
    finally:
        await store.close()  # waits for the reading ahead
    assert (_open_fds() or 0) <= (fds or 0)


@pytest.mark.skipif(not hasattr(os, "O_NOATIME"), reason="O_NOATIME is Linux only")
async def test_reading_the_queue_writes_no_access_times(dirs: Dirs) -> None:
    store = dirs.open()
    id = await store.write(make_envelope(), NOW)
    await store.close()
    files = [dirs.meta / f"{id}.meta", dirs.env / f"{id}.env"]
    for path in files:
        os.utime(path, (1_000_000_000, path.stat().st_mtime))  # relatime would update these
    again = dirs.open()
    try:
        await again.load()
        await again.get_entry(id)
        await again.get_infos([id])
    finally:
        await again.close()
    assert [path.stat().st_atime for path in files] == [1_000_000_000] * 2
