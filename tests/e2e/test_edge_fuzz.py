"""``smtpq serve`` fuzzed: several clients send random bytes and hostile fragments of SMTP for a
bounded time; afterwards the daemon serves a normal message, has no traceback in its log, and
its resident memory and open descriptors are back where they were."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from pathlib import Path

from tests.e2e.conftest import DaemonFactory
from tests.helpers import until
from tests.integration.smtp.sink import Sink

SECONDS = 3.0
CLIENTS = 6
SEED = 20261201

_WORDS = [
    b"EHLO fuzz.example", b"HELO x", b"MAIL FROM:<a@fuzz.example>", b"MAIL FROM:<>",
    b"RCPT TO:<b@dest.example>", b"RCPT TO:<postmaster>", b"RCPT TO:<a%b@dest.example>",
    b"DATA", b"BDAT 10", b"BDAT 5 LAST", b"BDAT 99999999", b"RSET", b"NOOP", b"QUIT",
    b"VRFY root", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"*", b"EXPN x", b".",
    b"..", b"MAIL FROM:<\xff\xfe> SMTPUTF8", b"EHLO caf\xe9", b"NO\0OP", b"RCPT TO:<a\x01@b>",
]  # fmt: skip
_HOSTILE = [b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"x" * 5000, b"\0" * 64]


def fuzz_chunk(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(_WORDS) + b"\r\n"
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 400))
    if kind == 2:
        return rng.choice(_HOSTILE)
    return b"".join(rng.choice(_WORDS) + b"\r\n" for _ in range(rng.randrange(1, 8)))


async def fuzz_client(port: int, rng: random.Random, until_time: float) -> int:
    """Sessions of random input until ``until_time``; how many it had."""
    loop = asyncio.get_running_loop()
    sessions = 0
    while loop.time() < until_time:
        sessions += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        drain = asyncio.create_task(reader.read(1 << 20))
        try:
            for _ in range(rng.randrange(1, 40)):
                writer.write(fuzz_chunk(rng))
                await writer.drain()
                if rng.random() < 0.3:
                    await asyncio.sleep(rng.random() * 0.02)
        except OSError:
            pass  # the edge closed it (a limit): fine
        ending = rng.randrange(3)
        if ending == 0:
            writer.transport.abort()
        else:
            if ending == 1 and writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
            writer.close()
        drain.cancel()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return sessions


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def deliver(port: int) -> str:
    """A normal session; the reply to its message."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"EHLO client.example\r\nMAIL FROM:<alice@origin.example>\r\n"
        b"RCPT TO:<bob@dest.example>\r\nDATA\r\n"
    )
    replies: list[str] = []  # the last line of each: greeting, EHLO, MAIL, RCPT, 354, 250, 221
    while len(replies) < 7:
        line = (await asyncio.wait_for(reader.readline(), 30)).decode().rstrip()
        assert line, replies
        if line[3:4] == " ":
            replies.append(line)
        if line.startswith("354"):
            writer.write(b"Subject: after the fuzz\r\n\r\nstill here\r\n.\r\nQUIT\r\n")
    writer.close()
    return replies[5]


async def test_fuzzed_daemon_recovers(daemon_factory: DaemonFactory, sink: Sink) -> None:
    daemon = await daemon_factory(
        {
            "edge": {
                "trusted_networks": [],
                "relay_domains": ["dest.example"],
                "error_delay": 0.05,
                "timeout": 5,
            },
            "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
        }
    )
    assert daemon.proc is not None
    pid = daemon.proc.pid
    # Warm up (imports, caches, the relay's pool), then take the measures.
    assert (await deliver(daemon.port)).startswith("250 2.6.0")
    await until(lambda: len(sink.received) == 1, timeout=30)
    await asyncio.sleep(0.5)
    rss, fds = rss_kib(pid), descriptors(pid)

    loop = asyncio.get_running_loop()
    stop_at = loop.time() + SECONDS
    rngs = [random.Random(SEED + n) for n in range(CLIENTS)]
    sessions = await asyncio.gather(*(fuzz_client(daemon.port, r, stop_at) for r in rngs))
    assert sum(sessions) >= CLIENTS

    assert (await deliver(daemon.port)).startswith("250 2.6.0")
    await until(lambda: any(b"after the fuzz" in m.data for m in sink.received), timeout=30)
    # Every fuzz session is gone; nothing it opened stays open.
    await until(lambda: descriptors(pid) <= fds, timeout=30)
    assert rss_kib(pid) - rss < 20 * 1024, (rss, rss_kib(pid))
    log = daemon.logs()
    assert "Traceback" not in log
    assert "\0" not in log
