"""The edge alone: smtpq's ``SmtpEdge`` storing into memory, beside aiosmtpd's no-op server and
a bare ``asyncio.Protocol`` sink, each loaded by Postfix's ``smtp-source`` in the same run
(issue 12 asks the edge for 5x aiosmtpd's no-op server).

One command (from the repository root, after ``make`` has made ``.venv``)::

    .venv/bin/python bench/edge_bench.py        # -n 5000 --runs 3 --sessions 1,10,50 --size 2048
    nice .venv/bin/python bench/edge_bench.py -n 500 --runs 1 --sessions 10    # a quick check

Each measurement runs in a fresh child process listening on 127.0.0.1, with uvloop as the
daemon runs (``--loop asyncio``: the plain loop):

- ``smtpq``: an ``SmtpEdge`` (the default ``EdgeConfig`` but for host, port, ``hostname`` and
  ``reverse_lookup = false``; loopback is a trusted network, so it may relay) in front of the
  daemon's own Queue (``build_queue`` of ``smtpq.daemon.server`` on a memory-storage
  ``Config``: the Received and Message-ID/Date policies run as in production) over a
  ``DictStorage``, without a relay: every message is stored, none delivered;
- ``aiosmtpd``: aiosmtpd's server with a handler whose ``handle_DATA`` returns ``250 OK``;
- ``raw``: a bare ``asyncio.Protocol`` SMTP sink (:class:`RawSink`): the protocol's own floor.

The parent runs ``smtp-source -s SESSIONS -m N -l SIZE -c`` against it (a new connection per
message), then stops the child by pid; the child reports how many messages it took (smtpq:
how many its storage holds) and its CPU time (user + system, ``time.process_time``) from the
moment it listened until the stop. Per run: msgs/s (N / smtp-source's wall time) and CPU ms
per message; a run where smtp-source failed or the server counted other than N is reported
and left out of the medians (exit status 1). Peers alternate their order each round; the
summary gives, per session count, medians and the ratios smtpq/aiosmtpd and smtpq/raw of
msgs/s and of CPU per message. ``--peers`` leaves some out, ``--json-out FILE`` keeps every
run. Nothing is logged in the children (no logging is configured, as for a library): the
daemon's one INFO line per queued message is not part of the edge's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import e2e
from smtpq import DictStorage
from smtpq.clock import SystemClock
from smtpq.daemon.config import Config, StorageConfig, StorageType
from smtpq.daemon.server import build_queue
from smtpq.edge import EdgeConfig, SmtpEdge

PEERS = ("smtpq", "aiosmtpd", "raw")
HOSTNAME = "edge.bench.example"
#: The edge's listen backlog (smtpq.edge.listener), given to the other peers too.
BACKLOG = 128
EHLO_REPLY = f"250-{HOSTNAME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 26214400\r\n".encode()


# -- the peers (in the child) --------------------------------------------------------------------


class Tally:
    """How many messages a peer took, over every connection."""

    def __init__(self) -> None:
        self.count = 0


class RawSink(asyncio.Protocol):
    """The least an SMTP server can do: greet, answer each command line, read DATA up to
    CRLF.CRLF and answer 250, over one buffer per connection; nothing checked, nothing kept."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(f"220 {HOSTNAME} ESMTP\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.tally.count += 1
                replies.append(b"250 2.0.0 Ok queued\r\n")
                continue
            line, crlf, rest = self.buffer.partition(b"\r\n")
            if not crlf:
                break
            self.buffer = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(EHLO_REPLY)
            elif verb == b"DATA":
                self.in_data = True
                # The line end before a message's first line belongs to the terminator, so
                # that an empty message (".\r\n" at once) ends too.
                self.buffer = b"\r\n" + self.buffer
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"".join(replies) + b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies:
            self.transport.write(b"".join(replies))


class NullHandler(Tally):
    """aiosmtpd's no-op handler: every message answered ``250 OK`` and dropped."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.count += 1
        return "250 OK"


async def serve(peer: str, port: int, ready: Callable[[], None], stop: asyncio.Event) -> int:
    """Run ``peer`` on 127.0.0.1:``port``, call ``ready`` once it listens, serve until
    ``stop`` is set; the messages it took."""
    if peer == "smtpq":
        config = Config(hostname=HOSTNAME, storage=StorageConfig(type=StorageType.MEMORY))
        storage = DictStorage()
        edge = EdgeConfig(host=e2e.HOST, port=port, hostname=HOSTNAME, reverse_lookup=False)
        async with (
            build_queue(config, storage, None, SystemClock()) as queue,
            SmtpEdge(queue, edge),
        ):
            ready()
            await stop.wait()
        return int((await storage.get_info())["size"])
    factory: Callable[[], asyncio.Protocol]
    if peer == "aiosmtpd":
        from aiosmtpd.smtp import SMTP

        # It logs each connection and command at INFO (dropped anyway: nothing is configured).
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        tally: Tally = NullHandler()
        factory = functools.partial(SMTP, tally, hostname=HOSTNAME, ident=HOSTNAME)
    else:
        tally = Tally()
        factory = functools.partial(RawSink, tally)
    loop = asyncio.get_running_loop()
    async with await loop.create_server(factory, e2e.HOST, port, backlog=BACKLOG):
        ready()
        await stop.wait()
    return tally.count


def child(args: argparse.Namespace) -> None:
    """Serve until SIGTERM; print "ready" when listening, then one JSON line at the end."""
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    cpu: list[float] = []

    def ready() -> None:
        cpu.append(time.process_time())
        print("ready", flush=True)

    async def main() -> int:
        stop = asyncio.Event()

        def stopping() -> None:
            cpu.append(time.process_time())  # before the servers' own shutdown
            stop.set()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping)
        return await serve(args.child, args.port, ready, stop)

    count = asyncio.run(main())
    print(json.dumps({"count": count, "cpu_s": cpu[1] - cpu[0]}), flush=True)


# -- the parent ----------------------------------------------------------------------------------


def source_command(sessions: int, n: int, size: int, port: int) -> list[str]:
    """smtp-source: N messages of SIZE bytes over SESSIONS parallel sessions, a new
    connection per message, each to one recipient that loopback may relay to."""
    return [
        e2e.SMTP_SOURCE,
        *("-s", str(sessions), "-m", str(n), "-l", str(size), "-c"),
        *("-f", e2e.SENDER, "-t", e2e.RECIPIENT, f"{e2e.HOST}:{port}"),
    ]


def one_run(peer: str, sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: a fresh child serving ``peer``, N messages from smtp-source."""
    command = [sys.executable, __file__, "--child", peer, "--port", str(args.port)]
    server = subprocess.Popen([*command, "--loop", args.loop], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    error = None
    elapsed = 0.0
    try:
        if server.stdout.readline().strip() == "ready":
            start = time.perf_counter()
            source = subprocess.run(
                source_command(sessions, args.n, args.size, args.port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=args.timeout,
                check=False,
            )
            elapsed = time.perf_counter() - start
            if source.returncode != 0:
                error = f"smtp-source exited with {source.returncode}: {source.stderr[-300:]}"
        else:
            error = "the server did not start (its error is above)"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    lines = out.splitlines()
    report = json.loads(lines[-1]) if server.returncode == 0 and lines else {}
    count = report.get("count", 0)
    if error is None and count != args.n:
        error = f"the server counted {count} messages, not {args.n}"
    return {
        "peer": peer,
        "sessions": sessions,
        "msgs_per_s": args.n / elapsed if elapsed else 0.0,
        "cpu_ms_per_msg": report.get("cpu_s", 0.0) / args.n * 1000,
        "count": count,
        "complete": error is None,
        "error": error,
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """Per session count and peer, the medians over its complete runs."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for sessions in dict.fromkeys(r["sessions"] for r in runs):
        for peer in PEERS:
            mine = [
                r
                for r in runs
                if (r["peer"], r["sessions"], r["complete"]) == (peer, sessions, True)
            ]
            if mine:
                out.setdefault(sessions, {})[peer] = {
                    key: statistics.median(r[key] for r in mine)
                    for key in ("msgs_per_s", "cpu_ms_per_msg")
                }
    return out


def ratios(row: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """smtpq's figures over each other peer's, at one session count: msgs/s (the issue's
    target: 5 over aiosmtpd) and CPU per message (below 1: smtpq costs less)."""
    if "smtpq" not in row:
        return {}
    smtpq = row["smtpq"]
    return {
        peer: {
            "msgs_per_s": smtpq["msgs_per_s"] / row[peer]["msgs_per_s"],
            "cpu_ms_per_msg": smtpq["cpu_ms_per_msg"] / row[peer]["cpu_ms_per_msg"],
        }
        for peer in PEERS[1:]
        if peer in row and row[peer]["cpu_ms_per_msg"] > 0
    }


def parent(args: argparse.Namespace) -> int:
    if not Path(e2e.SMTP_SOURCE).exists():
        print(f"{e2e.SMTP_SOURCE} is missing: install Postfix", file=sys.stderr)
        return 2
    if e2e.port_open(args.port):
        print(f"port {args.port} is in use", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    for sessions in args.sessions:
        for index in range(args.runs):
            for peer in args.peers if index % 2 == 0 else args.peers[::-1]:
                result = one_run(peer, sessions, args)
                runs.append(result)
                print(
                    f"s={sessions:<3d} run {index + 1} {peer:<8s}: "
                    f"{result['msgs_per_s']:8.0f} msgs/s  "
                    f"{result['cpu_ms_per_msg']:.3f} ms CPU/msg  count={result['count']}"
                    + (f"  FAILED: {result['error']}" if result["error"] else ""),
                    flush=True,
                )
    summary = summarize(runs)
    print(f"\nN={args.n} size={args.size} runs={args.runs} loop={args.loop}")
    print(
        f"{'sessions':>8}  {'peer':<9}{'msgs/s':>9}{'CPU ms/msg':>12}   (medians of complete runs)"
    )
    for sessions, row in summary.items():
        for peer, figures in row.items():
            print(
                f"{sessions:>8}  {peer:<9}{figures['msgs_per_s']:>9.0f}"
                f"{figures['cpu_ms_per_msg']:>12.3f}"
            )
        for peer, ratio in ratios(row).items():
            print(
                f"{sessions:>8}  smtpq/{peer}: {ratio['msgs_per_s']:.2f}x msgs/s, "
                f"{ratio['cpu_ms_per_msg']:.2f}x CPU per message"
            )
    if args.json_out:
        meta = {
            "n": args.n,
            "size": args.size,
            "runs": args.runs,
            "sessions": args.sessions,
            "loop": args.loop,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        table = {str(s): {"medians": row, "ratios": ratios(row)} for s, row in summary.items()}
        document = {"meta": meta, "summary": table, "runs": runs}
        Path(args.json_out).write_text(json.dumps(document, indent=1) + "\n")
    failed = [r for r in runs if not r["complete"]]
    if failed:
        print(f"{len(failed)} run(s) incomplete", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    try:
        import uvloop  # noqa: F401

        default_loop = "uvloop"
    except ImportError:
        default_loop = "asyncio"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="messages per measurement")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each peer once per round)")
    parser.add_argument("--sessions", default="1,10,50", help="smtp-source's parallel sessions")
    parser.add_argument("--port", type=int, default=2538, help="the server's port")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--json-out", help="write every run and the summary here")
    parser.add_argument("--peers", default=",".join(PEERS), help="which of smtpq, aiosmtpd, raw")
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.peers = tuple(p for p in args.peers.split(",") if p)
    if not set(args.peers) <= set(PEERS):
        parser.error(f"--peers: choose among {', '.join(PEERS)}")
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
