"""python-slimta 5.0.5's DiskStorage under the same load as bench/disk_bench.py (one measurement).

Runs with the interpreter of a virtualenv that has python-slimta (disk_bench.py makes one at
bench/work/slimta-venv); it contains no slimta code, it only drives it::

    bench/work/slimta-venv/bin/python -W ignore bench/slimta_disk_bench.py \\
        --mode write --concurrency 100 -n 2000 --size 2048 --dir /path/to/empty/dir

``write``: C producer greenlets call ``Queue.enqueue`` on a queue without a relay, so only
``DiskStorage.write`` is timed (slimta never fsyncs). ``cycle``: the same with an instant relay
(returns 250); timed until every message was relayed and its ``remove`` completed. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def envelope_bytes(i: int, size: int) -> tuple[bytes, bytes]:
    """The header block and body of message ``i`` (the same bytes as in disk_bench.py)."""
    header = (
        b"From: sender@example.com\r\nTo: rcpt@example.net\r\n"
        b"Subject: bench message %d\r\nMessage-Id: <%d.bench@example.com>\r\n\r\n" % (i, i)
    )
    line = b"x" * 76 + b"\r\n"
    return header, line * max(1, (size - len(header)) // len(line))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One run; slimta and gevent are imported here, so that ruff and mypy need neither."""
    import gevent
    from gevent.event import Event
    from slimta.diskstorage import DiskStorage
    from slimta.envelope import Envelope
    from slimta.queue import Queue
    from slimta.relay import Relay
    from slimta.smtp.reply import Reply

    n: int = args.n
    removed: set[str] = set()
    done = Event()
    dirs = [os.path.join(args.dir, d) for d in ("env", "meta", "tmp")]
    for d in dirs:
        os.mkdir(d)

    class CountingStorage(DiskStorage):  # type: ignore[misc]
        def remove(self, id: Any) -> None:
            super().remove(id)
            removed.add(id)
            if len(removed) >= n:
                done.set()

    class InstantRelay(Relay):  # type: ignore[misc]
        def attempt(self, envelope: Any, attempts: int) -> Any:
            return Reply("250", "2.0.0 Ok")

    envelopes = []
    for i in range(n):
        env = Envelope(f"sender{i}@example.com", ["rcpt@example.net"])
        header, body = envelope_bytes(i, args.size)
        env.parse(header + body)
        envelopes.append(env)
    store = CountingStorage(*dirs)
    queue = Queue(store, None if args.mode == "write" else InstantRelay())
    queue.start()
    gevent.sleep(0.05)
    errors: list[str] = []

    def producer(chunk: list[Any]) -> None:
        for env in chunk:
            for _env, result in queue.enqueue(env):
                if isinstance(result, BaseException):
                    errors.append(repr(result))

    c = args.concurrency
    cpu0, t0 = time.process_time(), time.perf_counter()
    gevent.joinall([gevent.spawn(producer, envelopes[i::c]) for i in range(c)], raise_error=True)
    if args.mode == "cycle":
        done.wait(timeout=600)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    queue.kill()
    return {
        "peer": "slimta",
        "mode": args.mode,
        "concurrency": c,
        "n": n,
        "msgs_per_s": n / elapsed,
        "cpu_us_per_msg": cpu / n * 1e6,
        "errors": len(errors),
        "complete": args.mode == "write" or len(removed) >= n,
    }


def main() -> None:
    """Parse the options, run once, print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["write", "cycle"], required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dir", required=True, help="an empty directory for the queue")
    print(json.dumps(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
