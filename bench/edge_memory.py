"""Peak resident memory of ``smtpq serve`` receiving large messages (issue 13).

For each line shape (2-octet and 998-octet lines: the shortest text lines and the longest
RFC 5321 allows) and each concurrency (1 and 4 messages at once), a fresh ``smtpq serve``
(disk storage, a smarthost) receives messages of ``--size-mib`` MiB over loopback. The
figures, from ``/proc/PID/status``:

- base: VmRSS after start-up and one small message (imports, pools and caches warm);
- peak: VmHWM while the large messages arrive, are stored and handed on (the high-water mark
  is reset after the small message, through ``/proc/PID/clear_refs``);
- after: VmRSS once every message is accepted and the queue is quiet again (``--settle``).

``--relay sink`` (default) delivers to a sink in this process that reads and drops each
message; ``--relay none`` names a smarthost that refuses connections, so each message is
stored and deferred: the edge and storage path alone. It measures memory, not time: a busy
machine changes nothing but how long it takes.

    .venv/bin/python bench/edge_memory.py                       # 25 MiB; 2 and 998; 1 and 4
    .venv/bin/python bench/edge_memory.py --relay none --json-out bench/work/memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "work"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def message(size: int, line: int) -> bytes:
    """A message of about ``size`` octets whose body lines have ``line`` octets of text."""
    head = b"From: a@bench.example\r\nTo: b@bench.example\r\nSubject: memory\r\n\r\n"
    text = (b"ab" * (line // 2 + 1))[:line] + b"\r\n"
    return head + text * ((size - len(head)) // len(text))


# -- the sink ------------------------------------------------------------------------------------


class Sink:
    """An SMTP server that answers everything and keeps nothing of the messages it reads."""

    def __init__(self, expected: int) -> None:
        self.messages = 0
        self.expected = expected
        self.all_in = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:  # the relay keeps its connection for the next message
            writer.close()
        await asyncio.sleep(0.1)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        writer.write(b"220 sink ESMTP\r\n")
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    tail = b""
                    while not tail.endswith(b"\r\n.\r\n"):
                        chunk = await reader.read(1 << 16)
                        if not chunk:
                            return
                        tail = (tail + chunk)[-5:]
                    self.messages += 1
                    if self.messages >= self.expected:
                        self.all_in.set()
                    writer.write(b"250 2.0.0 dropped\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        self.writers.discard(writer)
        writer.close()


# -- the client ----------------------------------------------------------------------------------


async def send(port: int, data: bytes) -> str:
    """One session with one message; the reply to its final dot."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        while True:
            line = (await asyncio.wait_for(reader.readline(), 600)).decode()
            if not line or line[3:4] != "-":
                return line.rstrip()

    await reply()
    writer.write(b"EHLO bench.example\r\n")
    await reply()
    writer.write(b"MAIL FROM:<a@bench.example>\r\nRCPT TO:<b@bench.example>\r\nDATA\r\n")
    for _ in range(3):
        last = await reply()
    assert last.startswith("354"), last
    view = memoryview(data)
    for at in range(0, len(view), 1 << 18):
        writer.write(view[at : at + (1 << 18)])
        await writer.drain()
    writer.write(b".\r\nQUIT\r\n")
    result = await reply()
    writer.close()
    return result


# -- one measurement -----------------------------------------------------------------------------


@dataclass
class Figures:
    line: int
    concurrency: int
    message_mib: float
    base_mib: float
    peak_mib: float
    after_mib: float
    replies: list[str]

    @property
    def growth_per_message(self) -> float:
        """Peak growth over base, in message sizes per message at once."""
        return (self.peak_mib - self.base_mib) / (self.message_mib * self.concurrency)


def config_text(root: Path, port: int, relay_port: int) -> str:
    return (
        'hostname = "mx.bench.example"\nlog_level = "warning"\nworkers = 1\n'
        f'[edge]\nlisten = ["127.0.0.1:{port}"]\nreverse_lookup = false\n'
        f'[storage]\ntype = "disk"\npath = "{root / "queue"}"\n'
        f'[relay]\ntype = "smarthost"\nhost = "127.0.0.1"\nport = {relay_port}\n'
        "[retry]\ninitial = 3600\n"
    )


def spawn(root: Path, port: int, relay_port: int) -> subprocess.Popen[bytes]:
    """``smtpq serve`` on ``port`` with its queue and log in ``root``."""
    (root / "smtpq.toml").write_text(config_text(root, port, relay_port))
    with open(root / "daemon.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "smtpq.daemon.cli", "serve", "-c", str(root / "smtpq.toml")],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def measure(line: int, concurrency: int, size: int, relay: str, settle: float) -> Figures:
    root = Path(tempfile.mkdtemp(prefix="edge-memory-", dir=WORK))
    sink = Sink(expected=concurrency + 1)  # and the warm-up message
    relay_port = await sink.start() if relay == "sink" else free_port()
    port = free_port()
    proc = spawn(root, port, relay_port)
    try:
        for _ in range(400):
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            await asyncio.sleep(0.05)
        data = message(size, line)
        await send(port, message(4096, 40))  # warm up
        await asyncio.sleep(1.0)
        base = status_kib(proc.pid, "VmRSS:")
        reset_peak(proc.pid)
        replies = await asyncio.gather(*(send(port, data) for _ in range(concurrency)))
        if relay == "sink":
            await asyncio.wait_for(sink.all_in.wait(), 600)
        await asyncio.sleep(settle)
        peak = status_kib(proc.pid, "VmHWM:")
        after = status_kib(proc.pid, "VmRSS:")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        await sink.stop()
        shutil.rmtree(root, ignore_errors=True)
    return Figures(
        line, concurrency, len(data) / MIB, base / 1024, peak / 1024, after / 1024, replies
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=float, default=24.9)
    parser.add_argument("--lines", default="2,998", help="octets of text per line")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--relay", choices=["sink", "none"], default="sink")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before 'after'")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    size = int(args.size_mib * MIB)
    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, relay={args.relay}, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| lines | at once | message MiB | base MiB | peak MiB | growth / message | after MiB |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for line in map(int, args.lines.split(",")):
        for concurrency in map(int, args.concurrency.split(",")):
            f = await measure(line, concurrency, size, args.relay, args.settle)
            results.append(f)
            ok = all(r.startswith("250 2.6.0") for r in f.replies)
            print(
                f"| {line} | {concurrency} | {f.message_mib:.1f} | {f.base_mib:.0f} | "
                f"{f.peak_mib:.0f} | {f.growth_per_message:.2f}x | {f.after_mib:.0f} |"
                + ("" if ok else f" replies: {f.replies}"),
                flush=True,
            )
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(f) for f in results], indent=1))


if __name__ == "__main__":
    asyncio.run(main())
