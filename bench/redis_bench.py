"""Throughput of smtpq's RedisStorage with 1, 2 and 4 Queue processes, beside its peers.

Everything runs against one private redis-server that this script starts on a free loopback port
(its data in a temporary directory, stopped by pid at the end), in one run, so that the figures
can be compared as ratios on a shared, noisy machine::

    .venv/bin/python bench/redis_bench.py --runs 3
    .venv/bin/python bench/redis_bench.py --workers 1,2,4 -n 4000 --concurrency 50 \
        --slimta-python bench/work/slimta-venv-redis/bin/python --json-out r.json

What is measured (msgs/s; N messages of ~SIZE bytes, one recipient, C producers per process):

* ``redis-benchmark``: SET of SIZE-byte values, 50 clients, without and with pipelining (-P 16):
  what the server itself can take on this machine.
* ``enqueue``: P processes, each an edge-only Queue (no relay) enqueueing N/P messages — the
  clock runs from a common start until the last enqueue returned (each one stored: one Lua call).
* ``e2e``: P processes, each a Queue with a relay that succeeds at once, enqueueing N/P messages:
  enqueue -> first attempt from memory -> remove; the clock stops when every message is removed.
* ``relay``: one edge-only process enqueues N messages while P worker processes claim, deliver
  (instant relay) and remove them: the scale-out shape; the clock stops when the queue is empty.
* ``slimta``: python-slimta 5.0.5's Queue + RedisStorage (``bench/slimta_redis_peer.py``, run by
  ``--slimta-python``), enqueue and e2e, one process (it cannot share a queue safely).

Every smtpq run checks that each message was attempted exactly once and that the queue is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the private server helper lives in tests/

PREFIX = "bench:"


# -- child processes -----------------------------------------------------------------------------


def _envelopes(count: int, size: int, first: int) -> list[Any]:
    from smtpq.envelope import Envelope

    line = b"x" * 76 + b"\r\n"
    out = []
    for i in range(first, first + count):
        head = b"From: <s%d@example.org>\r\nTo: <r@example.com>\r\nSubject: %d\r\n\r\n" % (i, i)
        env = Envelope(f"s{i}@example.org", ["r@example.com"])
        env.parse(head + line * max(1, (size - len(head)) // len(line)))
        out.append(env)
    return out


async def _child(args: argparse.Namespace) -> None:
    """One Queue process: enqueue its share and/or deliver; report times as a JSON line."""
    from smtpq.envelope import Envelope
    from smtpq.queue import Queue, QueueEvent
    from smtpq.relay.base import Relay, RelayResult
    from smtpq.storage import RedisStorage

    attempts: dict[str, int] = {}
    removed = 0
    all_removed = asyncio.Event()

    class InstantRelay(Relay):
        async def attempt(self, envelope: Envelope, n: int) -> RelayResult:
            attempts[envelope.sender] = attempts.get(envelope.sender, 0) + 1
            return None

    def observe(event: QueueEvent) -> None:
        nonlocal removed
        if event.kind == "removed":
            removed += 1
            if removed >= args.count:
                all_removed.set()

    store = RedisStorage.from_url(args.url, prefix=PREFIX, cluster=args.cluster)
    relay = InstantRelay() if args.role in ("e2e", "worker") else None
    envelopes = _envelopes(args.count, args.size, args.first) if args.role != "worker" else []
    loop = asyncio.get_running_loop()
    errors = 0
    async with Queue(store, relay) as queue:
        queue.observers.append(observe)
        if relay is not None:
            await store.wait(0.2)  # subscribed before the clock starts
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "go"
        cpu0, start = time.process_time(), time.time()

        async def producer(chunk: list[Envelope]) -> None:
            nonlocal errors
            for env in chunk:
                for _, result in await queue.enqueue(env):
                    errors += not isinstance(result, str)

        c = args.concurrency
        await asyncio.gather(*(producer(envelopes[i::c]) for i in range(c)))
        enqueued = time.time()
        if args.role == "e2e":
            await all_removed.wait()
        elif args.role == "worker":
            await loop.run_in_executor(None, sys.stdin.readline)  # "stop"
        end = time.time()
        cpu = time.process_time() - cpu0
    await store.close()
    result = {
        "start": start,
        "enqueued": enqueued,
        "end": end,
        "cpu_s": cpu,
        "errors": errors,
        "attempts": sum(attempts.values()),
        "attempted_ids": len(attempts),
        "removed": removed,
    }
    print(json.dumps(result), flush=True)


# -- parent ---------------------------------------------------------------------------------------


def _spawn(args: argparse.Namespace, url: str, role: str, count: int, first: int) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--url", url]
    cmd += ["-n", str(count), "--first", str(first), "--size", str(args.size)]
    cmd += ["--concurrency", str(args.concurrency)]
    if getattr(args, "cluster", False):
        cmd.append("--cluster")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"{role} child did not start: {line!r}")
    return proc


def _say(proc: Any, word: str) -> None:
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def _report(proc: Any) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _redis_cpu(client: Any) -> float:
    """CPU seconds redis-server has used (its main thread does the work)."""
    info = client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def _queue_size(client: Any) -> int:
    """Messages stored, over the shards (``client`` may be a cluster client)."""
    from smtpq.storage.redis.layout import DEFAULT_SHARDS, ShardKeys

    return sum(int(client.zcard(ShardKeys.of(PREFIX, "q", k).index)) for k in range(DEFAULT_SHARDS))


def run_smtpq(args: argparse.Namespace, url: str, mode: str, procs: int) -> dict[str, Any]:
    """One smtpq measurement; raises if a message was lost or attempted twice."""
    import redis

    n = args.n
    client = redis.Redis.from_url(url)
    client.flushall()
    redis_cpu0 = _redis_cpu(client)
    if mode == "relay":
        workers = [_spawn(args, url, "worker", 0, 0) for _ in range(procs)]
        edge = _spawn(args, url, "enqueue", n, 0)
        _say(edge, "go")
        for w in workers:
            _say(w, "go")
        edge_result = _report(edge)
        while _queue_size(client) > 0:
            time.sleep(0.005)
        end = time.time()
        for w in workers:
            _say(w, "stop")
        results = [_report(w) for w in workers]
        start, errors = edge_result["start"], edge_result["errors"]
        enqueue_seconds = edge_result["enqueued"] - start
    else:
        share = [n // procs + (i < n % procs) for i in range(procs)]
        firsts = [sum(share[:i]) for i in range(procs)]
        role = "enqueue" if mode == "enqueue" else "e2e"
        children = [_spawn(args, url, role, share[i], firsts[i]) for i in range(procs)]
        for child in children:
            _say(child, "go")
        results = [_report(child) for child in children]
        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
        enqueue_seconds = max(r["enqueued"] for r in results) - start
        errors = sum(r["errors"] for r in results)
    redis_cpu = _redis_cpu(client) - redis_cpu0
    attempts = sum(r["attempts"] for r in results)
    attempted = sum(r["attempted_ids"] for r in results)
    left = _queue_size(client)
    client.close()
    if mode != "enqueue" and (attempts != n or attempted != n or left != 0):
        raise RuntimeError(f"{mode}/{procs}: {attempts} attempts of {attempted}/{n}, {left} left")
    if errors:
        raise RuntimeError(f"{mode}/{procs}: {errors} enqueue errors")
    seconds = end - start
    return {
        "impl": "smtpq",
        "mode": mode,
        "processes": procs,
        "n": n,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(n / seconds, 1),
        "enqueue_msgs_per_s": round(n / enqueue_seconds, 1),
        "cpu_s": round(sum(r["cpu_s"] for r in results), 3),
        # Share of one core that redis-server used during the run: 1.0 is saturation.
        "redis_busy": round(redis_cpu / seconds, 2),
        "duplicate_attempts": attempts - n if mode != "enqueue" else 0,
    }


def run_slimta(args: argparse.Namespace, port: int, mode: str) -> dict[str, Any] | None:
    """One python-slimta measurement, or None when its interpreter is missing."""
    if not args.slimta_python or not Path(args.slimta_python).exists():
        return None
    cmd = [args.slimta_python, "-W", "ignore", str(ROOT / "bench" / "slimta_redis_peer.py")]
    cmd += ["--port", str(port), "--mode", mode, "-n", str(args.n), "--size", str(args.size)]
    cmd += ["--concurrency", str(args.concurrency)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_redis_benchmark(port: int, size: int, pipeline: int) -> float:
    """redis-benchmark SET requests/s on the private server."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-t", "set"]
    cmd += ["-n", "100000", "-c", "50", "-d", str(size), "-P", str(pipeline)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    found = re.findall(r"SET: ([\d.]+) requests per second", out.replace("\r", "\n"))
    return float(found[-1])


def main() -> None:
    """Run every measurement ``--runs`` times and print medians with ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=4000, help="messages per measurement")
    p.add_argument("--size", type=int, default=2048, help="approximate message size, bytes")
    p.add_argument("--concurrency", type=int, default=50, help="producers per process")
    p.add_argument("--workers", default="1,2,4", help="process counts to measure")
    p.add_argument("--modes", default="enqueue,e2e,relay")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--appendfsync", choices=("none", "everysec", "always"), default="none")
    slimta = Path(__file__).resolve().parent / "work/slimta-venv-redis/bin/python"
    p.add_argument("--slimta-python", default=str(slimta))
    p.add_argument("--json-out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.role, args.count = args.child, args.n
        asyncio.run(_child(args))
        return

    from tests.redis_server import RedisServer

    workdir = tempfile.mkdtemp(prefix="smtpq-redis-bench-")
    fsync = None if args.appendfsync == "none" else args.appendfsync
    server = RedisServer(Path(workdir) / "redis", appendfsync=fsync)
    server.start()
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.runs):
            for pipeline in (1, 16):
                rps = run_redis_benchmark(server.port, args.size, pipeline)
                runs.append({"impl": "redis-benchmark", "mode": f"SET -P {pipeline}", "rps": rps})
                print(json.dumps(runs[-1]), flush=True)
            for mode in ("enqueue", "e2e"):
                result = run_slimta(args, server.port, mode)
                if result is not None:
                    runs.append(result)
                    print(json.dumps(result), flush=True)
            for mode in args.modes.split(","):
                for procs in (int(w) for w in args.workers.split(",")):
                    runs.append(run_smtpq(args, server.url, mode, procs))
                    print(json.dumps({"run": r + 1, **runs[-1]}), flush=True)
    finally:
        server.close()
    summary = summarise(runs)
    print_summary(args, summary)
    if args.json_out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv, "cpus": os.cpu_count()}
        Path(args.json_out).write_text(
            json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1)
        )


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (implementation, mode, processes)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["impl"], run["mode"], int(run.get("processes", 0)))
        if run.get("rps") or run.get("msgs_per_s"):
            groups.setdefault(key, []).append(run)
    summary = []
    for (impl, mode, procs), group in groups.items():
        values = [float(r.get("rps") or r["msgs_per_s"]) for r in group]
        busy = [r["redis_busy"] for r in group if "redis_busy" in r]
        summary.append(
            {
                "impl": impl,
                "mode": mode,
                "processes": procs,
                "median": statistics.median(values),
                "runs": values,
                "redis_busy": statistics.median(busy) if busy else None,
            }
        )
    return summary


def print_summary(args: argparse.Namespace, summary: list[dict[str, Any]]) -> None:
    """A table of medians; smtpq rows also as a ratio to slimta's single process."""
    slimta = {s["mode"]: s["median"] for s in summary if s["impl"] == "slimta"}
    print(
        f"\nmedians of {args.runs} runs, msgs/s (redis-benchmark: requests/s), n={args.n}, "
        f"{args.size} B, {args.concurrency} producers/process, AOF {args.appendfsync}"
    )
    for s in summary:
        base = slimta.get("e2e" if s["mode"] == "relay" else s["mode"])
        ratio = f"  x{s['median'] / base:.2f} slimta" if s["impl"] == "smtpq" and base else ""
        procs = f" P={s['processes']}" if s["processes"] else ""
        busy = f"  redis {s['redis_busy']:.0%} busy" if s["redis_busy"] is not None else ""
        print(f"  {s['impl']:15s} {s['mode']:8s}{procs:5s} {s['median']:10.0f}{ratio}{busy}")


if __name__ == "__main__":
    main()
