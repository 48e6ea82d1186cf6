"""A Queue process on RedisStorage that shares its destinations' state through Redis.

``python -m tests.integration.destination_worker URL PREFIX HOST PORT [options]`` runs a Queue
relaying to the smarthost HOST:PORT (one destination) with a RedisDestinationStore, prints
``ready``, then reads commands from standard input: ``send N`` enqueues N messages (their first
attempts start here, from memory) and prints ``sent``. It runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from smtpq.envelope import Envelope
from smtpq.queue import Queue
from smtpq.queue.destinations import DestinationLimits, DestinationPolicy
from smtpq.relay.smtp import SmtpRelayConfig, StaticSmtpRelay
from smtpq.storage import RedisStorage
from smtpq.storage.redis_destinations import RedisDestinationStore


def message(seq: int) -> Envelope:
    """Message number ``seq`` of this process: its sender names both."""
    sender = f"w{os.getpid()}.{seq}@example.org"
    env = Envelope(sender, ["rcpt@example.com"])
    env.parse(f"From: <{sender}>\r\nSubject: {seq}\r\n\r\nHello.\r\n".encode())
    return env


async def run(args: argparse.Namespace) -> None:
    """Deliver until SIGTERM, enqueueing on command."""
    store = RedisStorage.from_url(args.url, prefix=args.prefix, lease_timeout=5.0)
    shared = RedisDestinationStore.from_url(args.url, args.prefix, lease_timeout=5.0)
    limits = DestinationLimits(
        concurrency=args.concurrency,
        initial_window=args.concurrency,
        message_rate=args.rate,
        dead_after=5,
    )
    relay = StaticSmtpRelay(
        args.host,
        args.port,
        config=SmtpRelayConfig(helo_name="worker.smtpq.test", connect_timeout=args.timeout),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    queue = Queue(
        store,
        relay,
        backoff=lambda env, attempts: 3600.0,
        poll_interval=0.5,
        grace_period=1.0,
        destinations=DestinationPolicy(default=limits),
        destination_store=shared,
    )
    # Standard input read on the loop (a thread blocked in readline would keep the process
    # from exiting).
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    async with queue:
        print("ready", flush=True)
        sequence = 0
        while not stop.is_set():
            reading = asyncio.ensure_future(commands.readline())
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
            if reading not in done:
                reading.cancel()
                break
            stopping.cancel()
            words = reading.result().split()
            if not words:
                await stop.wait()  # standard input closed: run until SIGTERM
                break
            count = int(words[1])
            await asyncio.gather(*(queue.enqueue(message(sequence + i)) for i in range(count)))
            sequence += count
            print("sent", flush=True)
    await relay.close()
    await shared.close()
    await store.close()


def main() -> None:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rate", type=float, default=None, help="messages per second")
    parser.add_argument("--timeout", type=float, default=5.0, help="connect timeout")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
