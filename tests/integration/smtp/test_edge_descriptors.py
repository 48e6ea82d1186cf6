"""Running out of file descriptors: an edge in a child process under a low ``RLIMIT_NOFILE``
(``edge_process.py``), on each loop. Accepting pauses (the waiting clients stay in the backlog,
neither refused nor dropped), resumes by itself when sessions close, says so in one log line,
and burns no CPU meanwhile."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.smtp.edge_peers import RUNNERS, RawClient

ROOT = Path(__file__).resolve().parents[3]
NOFILE = 48
CLIENTS = 60  # more than the child can hold, fewer than its listening backlog


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def greeting(client: RawClient, wait: float) -> str | None:
    """The greeting if it comes within ``wait``; None if it does not (still waiting); raises
    if the connection is closed."""
    try:
        line = await asyncio.wait_for(client.reader.readline(), wait)
    except TimeoutError:
        return None
    if not line:
        raise ConnectionError("closed without a greeting")
    return line.decode().rstrip()


@pytest.mark.parametrize("loop", list(RUNNERS))
def test_out_of_descriptors_pauses_and_resumes(loop: str, tmp_path: Path) -> None:
    stderr = tmp_path / "edge.log"
    with open(stderr, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.smtp.edge_process", "--loop", loop,
             "--nofile", str(NOFILE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
        )  # fmt: skip
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().split()[1])
        RUNNERS[loop](scenario(port, child.pid))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    text = stderr.read_text()
    assert text.count("out of file descriptors") == 1, text
    assert "Traceback" not in text
    assert len(text.splitlines()) < 10


async def scenario(port: int, pid: int) -> None:
    clients = [RawClient(*await asyncio.open_connection("127.0.0.1", port)) for _ in range(CLIENTS)]
    first = await asyncio.gather(*(greeting(c, 2.0) for c in clients))
    served = [c for c, g in zip(clients, first, strict=True) if g is not None]
    waiting = [c for c, g in zip(clients, first, strict=True) if g is None]
    assert served
    assert waiting  # the rest wait in the backlog: neither refused nor dropped
    assert all(g is None or g.startswith("220 ") for g in first)
    # Paused, not spinning: a second of waiting costs the child next to no CPU.
    before = cpu_seconds(pid)
    await asyncio.sleep(1.5)
    assert cpu_seconds(pid) - before < 0.3
    # Sessions closing make room: every waiting client gets its greeting, in turn.
    for client in served:
        await client.close()
    later = await asyncio.gather(*(greeting(c, 15.0) for c in waiting))
    assert all(g is not None and g.startswith("220 ") for g in later)
    # And the edge works as ever.
    client = waiting[0]
    await client.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    await client.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    replies = await client.replies(6)
    assert replies[4].startswith("250 2.6.0")
    for client in waiting:
        await client.close()
