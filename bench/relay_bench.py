"""The relay alone: a preloaded queue delivered into Postfix's ``smtp-sink``, through smtpq's
own SMTP client (``new``) and through today's aiosmtplib relay (``old``,
``bench/aiosmtplib_relay.py``), side by side in the same run (issue 12 asks for 3x).

One command (from the repository root, after ``make`` has made ``.venv``)::

    .venv/bin/python bench/relay_bench.py        # -n 5000 --runs 3 --concurrency 50 --size 2048
    nice .venv/bin/python bench/relay_bench.py -n 300 --runs 1    # a quick check

Each measurement runs in a fresh child process: a ``DictStorage`` (memory) holding N messages
of about SIZE bytes, one recipient each, all due; a ``Queue`` with ``relay_pool`` =
CONCURRENCY and a ``StaticSmtpRelay`` (or the old relay) to a fresh ``smtp-sink -c`` on
127.0.0.1 (plain text; smtp-sink advertises PIPELINING, so the new relay pipelines). The clock
runs from the Queue's start (it loads the schedule) until every message was removed; the child
reports messages per second and its own CPU time (user + system, ``time.process_time``) per
message, queue included — the same queue for both peers; the ``null`` peer (a relay that
delivers at once, without SMTP) measures that queue alone, so that the relays' own CPU can be
told apart. The parent checks that the sink counted N messages, alternates the peers' order
each round, and prints medians and the ratios new/old. ``--peers new,old`` leaves one out,
``--json-out FILE`` keeps every run, ``--loop asyncio`` runs the plain asyncio loop (default:
uvloop where installed, as the daemon does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiosmtplib_relay import AiosmtplibRelay

import e2e
from smtpq import DictStorage, Envelope, Queue, QueueEvent
from smtpq.relay import Relay, SmtpRelayConfig, StaticSmtpRelay, TlsMode

PEERS = ("new", "old", "null")


class NullRelay(Relay):
    """Delivers at once without SMTP: what the queue itself costs, to subtract."""

    async def attempt(self, envelope: Envelope, attempts: int) -> None:
        """Every recipient delivered."""


def message(size: int, index: int) -> bytes:
    """A plain text message of about ``size`` bytes."""
    header = (
        f"From: <sender@bench.example>\r\nTo: <rcpt{index}@sink.example>\r\n"
        f"Subject: relay bench {index}\r\nMessage-ID: <{index}@bench.example>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


def make_relay(peer: str, port: int) -> Relay:
    config = SmtpRelayConfig(helo_name="bench.example", tls=TlsMode.NONE)
    if peer == "null":
        return NullRelay()
    if peer == "new":
        return StaticSmtpRelay(e2e.HOST, port, config=config)
    return AiosmtplibRelay(e2e.HOST, port, config=config)


async def measure(peer: str, port: int, n: int, size: int, concurrency: int) -> dict[str, float]:
    """Deliver N preloaded messages through ``peer``; msgs/s and CPU ms per message."""
    store = DictStorage()
    now = time.time()
    for i in range(n):
        env = Envelope("sender@bench.example", [f"rcpt{i}@sink.example"])
        env.parse(message(size, i))
        await store.write(env, now)
    relay = make_relay(peer, port)
    removed = 0
    finished = asyncio.Event()

    def observe(event: QueueEvent) -> None:
        nonlocal removed
        if event.kind == "removed":
            removed += 1
            if removed == n:
                finished.set()

    cpu, start = time.process_time(), time.perf_counter()
    async with Queue(store, relay, relay_pool=concurrency) as queue:
        queue.observers.append(observe)
        await finished.wait()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await relay.close()
    return {"msgs_per_s": n / elapsed, "cpu_ms_per_msg": cpu / n * 1000, "seconds": elapsed}


def child(args: argparse.Namespace) -> None:
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    result = asyncio.run(measure(args.child, args.port, args.n, args.size, args.concurrency))
    print(json.dumps(result))


def one_run(peer: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One measurement: a fresh sink, a child delivering N messages into it."""
    sink = e2e.Sink(args.port, work)
    sink.start(args.n)
    try:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                peer,
                "--port",
                str(args.port),
                "-n",
                str(args.n),
                "--size",
                str(args.size),
                "--concurrency",
                str(args.concurrency),
                "--loop",
                args.loop,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        ).stdout
        counted = peer == "null" or sink.wait(time.monotonic() + 10) is not None
    finally:
        sink.stop()
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    expected = 0 if peer == "null" else args.n  # the null relay sends nothing
    complete = counted and sink.count == expected
    result.update(peer=peer, sink_count=sink.count, complete=complete)
    return result


def parent(args: argparse.Namespace) -> int:
    if e2e.port_open(args.port):
        print(f"port {args.port} is in use", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="smtpq-relay-bench-") as where:
        for index in range(args.runs):
            order = args.peers if index % 2 == 0 else args.peers[::-1]
            for peer in order:
                result = one_run(peer, args, Path(where))
                runs.append(result)
                print(
                    f"run {index + 1} {peer}: {result['msgs_per_s']:8.0f} msgs/s  "
                    f"{result['cpu_ms_per_msg']:.3f} ms CPU/msg  sink={result['sink_count']}",
                    flush=True,
                )
    failed = [r for r in runs if not r["complete"]]
    summary = summarize(runs)
    print(f"\nN={args.n} size={args.size} concurrency={args.concurrency} loop={args.loop}")
    print(f"{'peer':<6}{'msgs/s':>10}{'CPU ms/msg':>12}   (medians of complete runs)")
    for peer in PEERS:
        if peer in summary:
            row = summary[peer]
            print(f"{peer:<6}{row['msgs_per_s']:>10.0f}{row['cpu_ms_per_msg']:>12.3f}")
    if {"new", "old"} <= summary.keys():
        new, old = summary["new"], summary["old"]
        print(
            f"new/old: {new['msgs_per_s'] / old['msgs_per_s']:.2f}x throughput, "
            f"{old['cpu_ms_per_msg'] / new['cpu_ms_per_msg']:.2f}x less CPU per message"
        )
        if "null" in summary:
            queue = summary["null"]["cpu_ms_per_msg"]
            own_new, own_old = new["cpu_ms_per_msg"] - queue, old["cpu_ms_per_msg"] - queue
            print(
                f"without the queue's own {queue:.3f} ms: relay CPU new {own_new:.3f}, "
                f"old {own_old:.3f} ms/msg ({own_old / own_new:.2f}x)"
            )
    if args.json_out:
        meta = {"n": args.n, "size": args.size, "concurrency": args.concurrency, "loop": args.loop}
        Path(args.json_out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    if failed:
        print(f"{len(failed)} run(s) incomplete: the sink did not count N", file=sys.stderr)
        return 1
    return 0


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per peer, the medians over its complete runs."""
    out: dict[str, dict[str, float]] = {}
    for peer in PEERS:
        mine = [r for r in runs if r["peer"] == peer and r["complete"]]
        if mine:
            out[peer] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("msgs_per_s", "cpu_ms_per_msg")
            }
    return out


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
    parser.add_argument("--concurrency", type=int, default=50, help="the Queue's relay_pool")
    parser.add_argument("--port", type=int, default=2537, help="smtp-sink's port")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--json-out", help="write every run here")
    parser.add_argument(
        "--peers", default="new,old,null", help="which of new, old, null to measure"
    )
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.peers = tuple(p for p in args.peers.split(",") if p)
    if not set(args.peers) <= set(PEERS):
        parser.error(f"--peers: choose among {', '.join(PEERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
