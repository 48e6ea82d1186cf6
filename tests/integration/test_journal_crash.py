"""Crash safety of JournalStorage: SIGKILL a writer at random moments; everything acknowledged
survives.

The writer of the disk crash test (disk_crash_writer.py, in its ``journal`` mode: segments of
64 KiB, so that kills also land in segment rolls, deletions and compaction) writes, updates and
removes messages as fast as it can and reports each operation after it returned. After each
kill the journal is replayed and checked: every acknowledged write loads byte for byte, every
acknowledged removal is gone, acknowledged updates are there, nothing is damaged (a kill can cut
an append short: its torn tail is cut off, never counted as damage), and the storage works.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.integration.disk_crash_writer import JOURNAL, crash_envelope, journal_at
from tests.integration.test_disk_crash import Acknowledged, check_after_kill, run_and_kill

ROUNDS = 16


@pytest.mark.slow
async def test_sigkill_of_a_journal_writer_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acked = Acknowledged()
    for round in range(ROUNDS):
        lines = await run_and_kill(
            tmp_path, round * 1_000_000, rng, early=round % 5 == 4, sync=JOURNAL
        )
        new = [id for id in map(acked.take, lines) if id is not None]
        store = journal_at(tmp_path / "env")
        try:
            loaded = {id for _, id in await store.load()}
            info = await store.get_info()
            context = f"seed {seed}, round {round}"
            assert info["corrupt"] == 0, context
            await check_after_kill(store, loaded, acked, new, context)
        finally:
            await store.close()
    assert len(acked.written) > 200
    # In the end, every survivor once more, in a last replay.
    store = journal_at(tmp_path / "env")
    try:
        loaded = {id for _, id in await store.load()}
        for id, n in acked.written.items():
            if id in acked.removing():
                continue
            assert id in loaded
            entry = await store.get_entry(id)
            assert entry.envelope.to_bytes() == crash_envelope(n).to_bytes()
            assert entry.attempts == acked.attempts.get(id, entry.attempts)
        # Sixteen starts, each with a new segment, and the journal stays in its bounds.
        info = await store.get_info()
        assert info["journal_bytes"] <= 2 * info["live_bytes"] + 4 * 65536
    finally:
        await store.close()
