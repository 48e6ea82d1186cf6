"""The child of the crash tests: writes through DiskStorage (or JournalStorage) as fast as it
can until it is killed.

Run as ``python disk_crash_writer.py ENV_DIR META_DIR FIRST_COUNTER SYNC_MODE``; SYNC_MODE
``journal`` writes to a JournalStorage in ``ENV_DIR/../journal`` instead, with small segments
so that kills land in rolls, deletions and compaction too. It prints
``ready``, then one line per operation *after* the operation returned, with one ``os.write`` per
line (atomic on a pipe), so that the parent knows exactly what was acknowledged when its SIGKILL
lands:

    w <counter> <id>      write returned (the envelope is crash_envelope(counter))
    a <id> <attempts>     increment_attempts returned
    h <id>                set_held(id, True) returned
    r <id>                remove returned
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from smtpq.envelope import Envelope
from smtpq.storage import DiskStorage, JournalStorage, QueueStorage
from smtpq.storage.disk import SyncMode

WRITERS = 16
#: Every message whose counter is a multiple of this is removed after it was written.
REMOVE_EVERY = 5
TIMESTAMP = 1_800_000_000.0


def crash_envelope(counter: int) -> Envelope:
    """A deterministic envelope of about 2 KB, different for each counter."""
    rng = random.Random(counter)
    env = Envelope(f"c{counter}@crash.example", [f"r{i}@example.net" for i in range(3)])
    body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1500, 2500)))
    env.parse(b"Subject: crash %d\r\n\r\n" % counter + body)
    env.client = {"ip": "127.0.0.1", "name": f"n{counter}"}
    return env


def counter_of(envelope: Envelope) -> int:
    """The counter a crash envelope was made from."""
    return int(envelope.sender[1:].split("@")[0])


#: The SYNC_MODE argument that means a JournalStorage.
JOURNAL = "journal"


def journal_at(env_dir: str | os.PathLike[str]) -> JournalStorage:
    """The journal a crash writer given ``env_dir`` writes to (small segments: 64 KiB)."""
    return JournalStorage(os.path.join(os.path.dirname(env_dir), "journal"), segment_size=65536)


def say(line: str) -> None:
    os.write(1, line.encode() + b"\n")


async def main(env_dir: str, meta_dir: str, first: int, sync: str) -> None:
    store: QueueStorage
    if sync == JOURNAL:
        store = journal_at(env_dir)
    else:
        store = DiskStorage(env_dir, meta_dir, sync=SyncMode(sync))
    await store.load()
    say("ready")
    counters = iter(range(first, first + 10_000_000))

    async def writer() -> None:
        while True:
            n = next(counters)
            id = await store.write(crash_envelope(n), TIMESTAMP)
            say(f"w {n} {id}")
            if n % 4 == 0:
                say(f"a {id} {await store.increment_attempts(id)}")
            if n % 7 == 0:
                await store.set_held(id, True)
                say(f"h {id}")
            if n % REMOVE_EVERY == 0:
                await store.remove(id)
                say(f"r {id}")

    await asyncio.gather(*(writer() for _ in range(WRITERS)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
