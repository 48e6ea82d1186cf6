"""A child of the full-disk tests: a storage whose files may not grow past 20,000 bytes.

Run as ``python fsize_child.py disk ENV_DIR META_DIR`` or ``python fsize_child.py journal
PATH``. With ``RLIMIT_FSIZE`` set (and SIGXFSZ ignored, so that ``write(2)`` fails with EFBIG
instead of killing the process) it writes a small message, then one too large for the limit,
then another small one, and prints as JSON the ids it wrote (``written``) and what the large
write raised (``error``: message, reply code, enhanced code).
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys
from typing import Any

from smtpq.envelope import Envelope
from smtpq.errors import QueueError
from smtpq.storage import DiskStorage, JournalStorage, QueueStorage

LIMIT = 20_000


def envelope(subject: bytes, size: int) -> Envelope:
    env = Envelope("a@example.org", ["b@example.com"])
    env.parse(b"Subject: " + subject + b"\r\n\r\n" + b"y" * size)
    return env


async def main(kind: str, paths: list[str]) -> None:
    store: QueueStorage = DiskStorage(*paths) if kind == "disk" else JournalStorage(*paths)
    written = [await store.write(envelope(b"small", 10), 1.0)]
    error = None
    try:
        await store.write(envelope(b"big", 50_000), 1.0)
    except QueueError as exc:
        error = [str(exc), exc.reply.code, exc.reply.enhanced_status_code]
    written.append(await store.write(envelope(b"after", 10), 1.0))
    await store.close()
    print(json.dumps({"written": written, "error": error}))


async def run(kind: str, *paths: str) -> dict[str, Any]:
    """Run this child; its JSON (the caller's test fails if the child does)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, kind, *paths,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
