"""Crash safety: SIGKILL a writer at random moments; everything acknowledged survives.

A child process (disk_crash_writer.py) writes, updates and removes messages through DiskStorage
as fast as it can and reports each operation only after it returned; the rounds take turns at
the sync modes, so that both forms of a batch's first flush (one syncfs, or the files' syncs)
are cut short. The parent kills it with
SIGKILL at random moments — during its start-up load too — then reopens the queue and checks:
every acknowledged write loads with its envelope byte for byte, every acknowledged removal is
gone, acknowledged updates are there, nothing is corrupt or left over, and the storage still
works. SIGKILL leaves the page cache intact, so this shows atomicity and recovery; fsync (power
loss) cannot be shown without pulling the plug.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smtpq.errors import MessageGone
from smtpq.storage import DiskStorage, QueueStorage
from smtpq.storage.disk import SyncMode
from smtpq.storage.disk.libc import syncfs_function
from tests.integration import disk_crash_writer
from tests.integration.disk_crash_writer import counter_of, crash_envelope

ROUNDS = 24
WRITER = Path(disk_crash_writer.__file__)
# "syncfs" where the kernel has one that reports errors (elsewhere "auto" is "fsync" too).
MODES = [SyncMode.AUTO, SyncMode.FSYNC] + ([SyncMode.SYNCFS] if syncfs_function() else [])


@dataclass
class Acknowledged:
    """What the children reported as done."""

    written: dict[str, int] = field(default_factory=dict)  # id -> counter
    attempts: dict[str, int] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)

    def removing(self) -> set[str]:
        """Messages whose removal was acknowledged, or may have been under way."""
        return {id for id, n in self.written.items() if n % disk_crash_writer.REMOVE_EVERY == 0}

    def take(self, line: str) -> str | None:
        """Record one line; the id it wrote, if it was a write."""
        kind, *rest = line.split()
        if kind == "w":
            self.written[rest[1]] = int(rest[0])
            return rest[1]
        if kind == "a":
            self.attempts[rest[0]] = int(rest[1])
        elif kind == "h":
            self.held.add(rest[0])
        elif kind == "r":
            self.removed.add(rest[0])
        return None


async def run_and_kill(
    root: Path, first: int, rng: random.Random, *, early: bool, sync: str
) -> list[str]:
    """Start a writer, SIGKILL it at a random moment; its complete output lines.

    An early kill lands at a random time after the start, maybe while the writer is still
    starting up or loading the queue; any other at a random time after its first write.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(root / "env"),
        str(root / "meta"),
        str(first),
        sync,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    seen = b""
    if not early:
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        seen = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert seen.startswith(b"w "), seen
    await asyncio.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    out = seen + await proc.stdout.read()
    assert await proc.wait() == -signal.SIGKILL
    lines = out.decode().split("\n")
    complete = lines[:-1]  # the last one is empty or was cut by the kill
    if complete and complete[0] == "ready":
        complete = complete[1:]
    return complete


async def check_after_kill(
    store: QueueStorage, loaded: set[str], acked: Acknowledged, new: list[str], context: str
) -> None:
    """What a storage must show after a kill: every acknowledged write, unless the child was
    removing it, and no acknowledged removal; the new messages whole; a storage that works."""
    assert set(acked.written) - acked.removing() <= loaded, context
    assert not acked.removed & loaded, context
    # New messages, acknowledged or not, are whole: byte for byte what was written.
    unacked = loaded - set(acked.written)
    for id in loaded & (set(new) | unacked):
        entry = await store.get_entry(id)
        n = acked.written.get(id, counter_of(entry.envelope))
        assert entry.envelope.to_bytes() == crash_envelope(n).to_bytes(), context
        assert entry.attempts >= acked.attempts.get(id, 0), context
        assert entry.held or id not in acked.held, context
    # ... and the storage goes on working after the crash.
    id = await store.write(crash_envelope(-1), 1.0)
    assert (await store.get(id))[0].to_bytes() == crash_envelope(-1).to_bytes()
    await store.remove(id)
    with pytest.raises(MessageGone):
        await store.get(id)


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


@pytest.mark.slow
async def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acked = Acknowledged()
    kills = killed_while_writing = leftovers = 0
    for round in range(ROUNDS):
        sync = MODES[round % len(MODES)]
        lines = await run_and_kill(
            tmp_path, round * 1_000_000, rng, early=round % 5 == 4, sync=sync
        )
        kills += 1
        new = [id for id in map(acked.take, lines) if id is not None]
        killed_while_writing += bool(new)

        store = DiskStorage(tmp_path / "env", tmp_path / "meta")
        try:
            loaded = {id for _, id in await store.load()}
            info = await store.get_info()
            leftovers += info["scratch_removed"] + info["orphans_removed"]
            context = f"seed {seed}, round {round}, sync {sync}"
            # Nothing is corrupt, and nothing was dropped: what is on disk is what loaded.
            assert info["corrupt"] == info["corrupt_stored"] == 0, context
            assert names(tmp_path / "meta" / "corrupt") == set(), context
            assert {n[:-5] for n in names(tmp_path / "meta") if n.endswith(".meta")} == loaded
            assert {n[:-4] for n in names(tmp_path / "env") if n.endswith(".env")} == loaded
            assert not [n for n in names(tmp_path / "meta" / "tmp") if n.endswith(".tmp")]
            await check_after_kill(store, loaded, acked, new, context)
        finally:
            await store.close()

    assert kills >= 20
    assert killed_while_writing >= ROUNDS - ROUNDS // 5
    assert len(acked.written) > 200
    assert leftovers > 0, "no kill ever interrupted an operation: recovery went untested"
    # In the end, every survivor once more, in a last restart.
    store = DiskStorage(tmp_path / "env", tmp_path / "meta")
    try:
        loaded = {id for _, id in await store.load()}
        removing = acked.removing()
        for id, n in acked.written.items():
            if id in removing:
                continue
            assert id in loaded
            entry = await store.get_entry(id)
            assert entry.envelope.to_bytes() == crash_envelope(n).to_bytes()
            assert entry.attempts == acked.attempts.get(id, entry.attempts)
    finally:
        await store.close()
