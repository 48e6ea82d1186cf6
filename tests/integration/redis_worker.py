"""A Queue process on RedisStorage, for the multi-process tests (and the benchmark's shape).

``python -m tests.integration.redis_worker worker URL PREFIX RECORD [--lease S] [--hang]``
    runs a Queue with a relay that appends ``<sender> <pid>`` to RECORD for every delivery
    (O_APPEND: whole lines, safe across processes), until SIGTERM. With ``--hang`` the relay
    records ``<sender>`` in RECORD.started and never returns: a worker to be killed mid-attempt.
    Prints ``ready`` once its Queue runs.

``python -m tests.integration.redis_worker edge URL PREFIX OUT --count N [--batch B]``
    an edge-only Queue (no relay) that enqueues N messages from ``m<seq>@example.org`` and
    appends ``ok <seq> <id>`` or ``err <seq> <reply code>`` to OUT as each enqueue returns;
    ``--pause S`` waits S seconds between batches (a steady load over a longer time).

Both take ``--cluster`` (URL is a node of a Redis Cluster), ``--wait-replicas N`` and
``--wait-timeout S``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from smtpq.envelope import Envelope
from smtpq.errors import QueueError
from smtpq.queue import Queue
from smtpq.relay.base import Relay, RelayResult
from smtpq.storage import RedisStorage


class RecordingRelay(Relay):
    """Delivers by appending a line per message to a file that every process shares."""

    def __init__(self, path: str, *, hang: bool = False) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.hang = hang
        self.started = os.open(path + ".started", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        """Record the delivery (or, hanging, the start of the attempt) by the sender's name."""
        if self.hang:
            os.write(self.started, f"{envelope.sender}\n".encode())
            await asyncio.Event().wait()
        os.write(self.fd, f"{envelope.sender} {os.getpid()}\n".encode())
        return None


def message(seq: int) -> Envelope:
    """Message number ``seq``: its sender names it."""
    env = Envelope(f"m{seq}@example.org", ["rcpt@example.com"])
    env.parse(b"From: <m%d@example.org>\r\nSubject: %d\r\n\r\nHello.\r\n" % (seq, seq))
    return env


async def worker(args: argparse.Namespace) -> None:
    """Deliver until SIGTERM."""
    store = RedisStorage.from_url(
        args.url,
        prefix=args.prefix,
        cluster=args.cluster,
        lease_timeout=args.lease,
        wait_replicas=args.wait_replicas,
        wait_timeout=args.wait_timeout,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    relay = RecordingRelay(args.record, hang=args.hang)
    async with Queue(store, relay, poll_interval=0.5, grace_period=2.0):
        print("ready", flush=True)
        await stop.wait()
    await store.close()


async def edge(args: argparse.Namespace) -> None:
    """Enqueue ``args.count`` messages, ``args.batch`` at a time, recording each result."""
    store = RedisStorage.from_url(
        args.url,
        prefix=args.prefix,
        cluster=args.cluster,
        wait_replicas=args.wait_replicas,
        wait_timeout=args.wait_timeout,
    )
    out = os.open(args.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def one(queue: Queue, seq: int) -> None:
        [(_, result)] = await queue.enqueue(message(seq))
        if isinstance(result, QueueError):
            line = f"err {seq} {result.reply.code}\n"
        else:
            line = f"ok {seq} {result}\n"
        os.write(out, line.encode())

    async with Queue(store) as queue:
        for start in range(0, args.count, args.batch):
            end = min(start + args.batch, args.count)
            await asyncio.gather(*(one(queue, seq) for seq in range(start, end)))
            if args.pause:
                await asyncio.sleep(args.pause)
    await store.close()


def main() -> None:
    """Parse the command line and run the chosen role."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("url")
    w.add_argument("prefix")
    w.add_argument("record")
    w.add_argument("--lease", type=float, default=2.0)
    w.add_argument("--hang", action="store_true")
    e = sub.add_parser("edge")
    e.add_argument("url")
    e.add_argument("prefix")
    e.add_argument("out")
    e.add_argument("--count", type=int, required=True)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--pause", type=float, default=0.0)
    for role in (w, e):
        role.add_argument("--cluster", action="store_true")
        role.add_argument("--wait-replicas", type=int, default=0)
        role.add_argument("--wait-timeout", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(worker(args) if args.role == "worker" else edge(args))


if __name__ == "__main__":
    main()
