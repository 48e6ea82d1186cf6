"""python-slimta 5.0.5's Queue on its RedisStorage: the peer that bench/redis_bench.py runs.

Runs under the interpreter of a separate virtualenv (gevent, not asyncio); it contains no slimta
code, it only drives it::

    python3 -m venv bench/work/slimta-venv-redis
    bench/work/slimta-venv-redis/bin/pip install python-slimta==5.0.5 'setuptools>=80,<82' redis
    bench/work/slimta-venv-redis/bin/python -W ignore bench/slimta_redis_peer.py \
        --port 6390 --mode e2e -n 4000 --concurrency 50

One measurement per run, printed as one JSON line:

* ``enqueue``: a Queue without a relay; N ~SIZE-byte envelopes are enqueued by C producer
  greenlets; the clock stops when the last ``enqueue`` returned.
* ``e2e``: a Queue with a relay that succeeds at once; the clock stops when every message has
  been removed (slimta removes in a spawned greenlet: removals are counted in a subclass).
  ``duplicate_attempts`` counts relay calls beyond one per message.
"""

import argparse
import json
import os
import time


def main():
    """Parse the command line, run one measurement, print its JSON line."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("enqueue", "e2e"), required=True)
    p.add_argument("-n", type=int, default=4000)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()

    import gevent
    from gevent.event import Event
    from slimta.envelope import Envelope
    from slimta.queue import Queue
    from slimta.redisstorage import RedisStorage
    from slimta.relay import Relay
    from slimta.smtp.reply import Reply

    n = args.n
    done = Event()
    removed = set()
    attempts = [0]

    class CountingStorage(RedisStorage):
        def remove(self, id):
            RedisStorage.remove(self, id)
            removed.add(id)
            if len(removed) >= n:
                done.set()

    class InstantRelay(Relay):
        def attempt(self, envelope, attempts_so_far):
            attempts[0] += 1
            return Reply("250", "2.0.0 Ok")

    prefix = f"slimtabench:{os.getpid()}:"
    store = CountingStorage(host=args.host, port=args.port, prefix=prefix)
    # redis-py >= 6 caps a pool at 100 connections; slimta holds one per running attempt, so
    # lift the cap as the redis-py of slimta's time (unbounded) had it.
    store.redis.connection_pool.max_connections = 100_000
    envelopes = []
    line = b"x" * 76 + b"\r\n"
    for i in range(n):
        head = b"From: <s%d@example.org>\r\nTo: <r@example.com>\r\nSubject: %d\r\n\r\n" % (i, i)
        env = Envelope(f"s{i}@example.org", ["r@example.com"])
        env.parse(head + line * max(1, (args.size - len(head)) // len(line)))
        envelopes.append(env)

    relay = InstantRelay() if args.mode == "e2e" else None
    queue = Queue(store, relay)
    queue.start()
    gevent.sleep(0.05)
    errors = []

    def producer(chunk):
        for env in chunk:
            for _, result in queue.enqueue(env):
                if isinstance(result, BaseException):
                    errors.append(repr(result))

    c = args.concurrency
    cpu0, t0 = time.process_time(), time.perf_counter()
    gevent.joinall([gevent.spawn(producer, envelopes[i::c]) for i in range(c)], raise_error=True)
    t_enqueue = time.perf_counter() - t0
    t_e2e = None
    if args.mode == "e2e":
        completed = done.wait(timeout=args.timeout)
        t_e2e = time.perf_counter() - t0 if completed else None
        gevent.sleep(0.5)  # let late duplicate attempts show
    cpu = time.process_time() - cpu0
    seconds = t_enqueue if args.mode == "enqueue" else t_e2e
    print(
        json.dumps(
            {
                "impl": "slimta",
                "mode": args.mode,
                "processes": 1,
                "n": n,
                "seconds": seconds,
                "msgs_per_s": n / seconds if seconds else None,
                "enqueue_msgs_per_s": n / t_enqueue,
                "cpu_s": cpu,
                "errors": len(errors),
                "duplicate_attempts": attempts[0] - n if args.mode == "e2e" else 0,
            }
        )
    )
    queue.kill()
    for key in store.redis.scan_iter(match=prefix + "*"):
        store.redis.delete(key)


if __name__ == "__main__":
    main()
