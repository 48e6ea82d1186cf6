"""python-slimta 5.0.5 as a peer MTA for bench/e2e.py: SmtpEdge -> Queue(DiskStorage) -> relay.

Run it with the interpreter of the slimta virtualenv (slimta needs gevent, which the project
does not use; this file is therefore excluded from mypy)::

    bench/work/slimta-venv/bin/python -W ignore bench/slimta_mta.py \
        --listen 127.0.0.1:2535 --relay 127.0.0.1:2536 --queue-dir bench/work/q

It wires only slimta's own parts, as its manual shows: ``SmtpEdge`` on the listen address,
``Queue`` over ``DiskStorage`` (env/meta/tmp directories under --queue-dir; slimta never
fsyncs), ``StaticSmtpRelay`` to the next hop with a pool of --relay-pool connections that are
reused while busy, and a backoff so that a transient failure is retried (slimta's default
backoff gives up at once). It prints ``ready`` once listening, and exits on SIGTERM or SIGINT.
"""

import argparse
import os
import signal
import sys

import gevent
from gevent.event import Event
from slimta.diskstorage import DiskStorage
from slimta.edge.smtp import SmtpEdge
from slimta.queue import Queue
from slimta.relay.smtp.static import StaticSmtpRelay


def backoff(envelope: object, attempts: int) -> float | None:
    """Retry after 5 s, 10 s, 20 s, ... and give up after 8 attempts (then slimta bounces)."""
    if attempts > 8:
        return None
    return 5.0 * 2 ** (attempts - 1)


def hostport(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    """Start the edge and the queue, and serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port of the SMTP edge")
    parser.add_argument("--relay", required=True, help="host:port of the next hop")
    parser.add_argument("--queue-dir", required=True)
    parser.add_argument("--relay-pool", type=int, default=20, help="max relay connections")
    parser.add_argument("--idle-timeout", type=float, default=10.0, help="relay reuse window")
    args = parser.parse_args()

    dirs = [os.path.join(args.queue_dir, name) for name in ("env", "meta", "tmp")]
    for path in dirs:
        os.makedirs(path, exist_ok=True)
    host, port = hostport(args.relay)
    # The sink speaks no TLS; StaticSmtpRelay only starts TLS when the server offers it.
    relay = StaticSmtpRelay(
        host,
        port,
        pool_size=args.relay_pool,
        idle_timeout=args.idle_timeout,
        ehlo_as="slimta.bench.localdomain",
    )
    queue = Queue(DiskStorage(*dirs), relay, backoff=backoff)
    edge = SmtpEdge(hostport(args.listen), queue, hostname="slimta.bench.localdomain")
    queue.start()
    edge.start()

    stop = Event()
    # gevent's signal handlers run in the hub, where setting an Event is safe.
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    stop.wait()
    edge.kill()
    queue.kill()
    # Not relay.kill(): in 5.0.5 it iterates its client set while the clients remove
    # themselves (RuntimeError). The process exits here anyway.
    sys.exit(0)


if __name__ == "__main__":
    main()
