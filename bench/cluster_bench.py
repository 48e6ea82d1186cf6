"""Delivered messages per second over one Redis and over a Redis Cluster, with each server's CPU.

Starts, in one run, a private redis-server and a private 3-master Redis Cluster on free loopback
ports (data in a temporary directory, stopped by pid at the end), and measures on each, with 1,
2 and 4 Queue processes (``bench/redis_bench.py``'s children), N messages of SIZE bytes going
enqueue -> deliver (a relay that succeeds at once) -> remove::

    .venv/bin/python bench/cluster_bench.py --runs 3 -n 8000 --json-out /tmp/cluster-bench.json
    nice .venv/bin/python bench/cluster_bench.py --runs 1 -n 200      # a smoke run

Modes (``--modes``):

* ``e2e``: P processes, each accepting its share (an edge) and delivering it itself: the write
  is already leased to it (one WRITE, then one REMOVE script per message) — ``smtpq serve`` on
  every node;
* ``relay``: one edge-only process enqueues everything while P worker processes claim, deliver
  and remove: WRITE, CLAIM (shared by a batch), GET, REMOVE per message — edge and delivery
  nodes apart.

For each run: msgs/s from the first enqueue until the queue is empty; every redis-server's CPU
seconds from ``/proc/PID/stat`` (so also the cluster bus and replication, if any), as µs per
message and as the busiest server's share of a core; and the commands Redis executed per
message (``INFO commandstats``, summed over the servers: scripts, reads, publishes), which is
the count of round trips' worth of work the model in ``bench/RESULTS.md`` is built from.
Every run checks that each message was attempted exactly once and that the queue is empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the private server helpers live in tests/

import redis_bench  # noqa: E402 - after the path: the Queue child processes are its own

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def commandstats(client: Any) -> Counter[str]:
    """Calls per command since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return Counter({name[len("cmdstat_") :]: int(v["calls"]) for name, v in stats.items()})


class Target:
    """The Redis under test: one server, or a cluster of masters (and replicas)."""

    def __init__(self, name: str, workdir: Path, masters: int, replicas: int) -> None:
        from tests.redis_server import RedisClusterServers, RedisServer

        self.name = name
        self.cluster = name == "cluster"
        if self.cluster:
            self.servers = RedisClusterServers(
                workdir / name, masters=masters, replicas=replicas, node_timeout=15000
            )
            self.nodes = self.servers.nodes
        else:
            self.server = RedisServer(workdir / name)
            self.nodes = [self.server]

    @property
    def url(self) -> str:
        return self.servers.url if self.cluster else self.server.url

    def start(self) -> None:
        (self.servers if self.cluster else self.server).start()

    def close(self) -> None:
        (self.servers if self.cluster else self.server).close()

    def client(self) -> Any:
        """A client that routes by key (a cluster client on the cluster)."""
        import redis
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(self.url) if self.cluster else redis.Redis.from_url(self.url)

    def node_clients(self) -> list[Any]:
        import redis

        return [redis.Redis(n.host, n.port) for n in self.nodes]

    def reset(self) -> None:
        for client in self.node_clients():
            with client:
                if self.cluster and client.execute_command("ROLE")[0] != b"master":
                    continue
                client.flushall()
                client.config_resetstat()

    def cpu(self) -> list[float]:
        return [process_cpu(n.pid) for n in self.nodes]

    def commands(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for client in self.node_clients():
            with client:
                total += commandstats(client)
        return total


def run(args: argparse.Namespace, target: Target, mode: str, procs: int) -> dict[str, Any]:
    """One measurement; raises if a message was lost or attempted twice."""
    n = args.n
    target.reset()
    args.cluster = target.cluster
    url = target.url
    client = target.client()
    cpu0 = target.cpu()
    if mode == "relay":
        workers = [redis_bench._spawn(args, url, "worker", 0, 0) for _ in range(procs)]
        edge = redis_bench._spawn(args, url, "enqueue", n, 0)
        redis_bench._say(edge, "go")
        for w in workers:
            redis_bench._say(w, "go")
        start = redis_bench._report(edge)["start"]
        while redis_bench._queue_size(client) > 0:
            time.sleep(0.005)
        end = time.time()
        for w in workers:
            redis_bench._say(w, "stop")
        results = [redis_bench._report(w) for w in workers]
    else:
        share = [n // procs + (i < n % procs) for i in range(procs)]
        firsts = [sum(share[:i]) for i in range(procs)]
        children = [redis_bench._spawn(args, url, "e2e", share[i], firsts[i]) for i in range(procs)]
        for child in children:
            redis_bench._say(child, "go")
        results = [redis_bench._report(child) for child in children]
        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
    cpu = [after - before for before, after in zip(cpu0, target.cpu(), strict=True)]
    commands = target.commands()
    attempts = sum(r["attempts"] for r in results)
    attempted = sum(r["attempted_ids"] for r in results)
    left = redis_bench._queue_size(client)
    client.close()
    if attempts != n or attempted != n or left != 0:
        raise RuntimeError(f"{mode}/{procs}: {attempts} attempts of {attempted}/{n}, {left} left")
    seconds = end - start
    return {
        "target": target.name,
        "mode": mode,
        "processes": procs,
        "n": n,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(n / seconds, 1),
        "queue_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
        "redis_cpu_s": [round(c, 3) for c in cpu],
        "redis_us_per_msg": round(sum(cpu) / n * 1e6, 1),
        # The busiest server's share of one core: 1.0 is where Redis, not the workers, limits.
        "redis_busiest": round(max(cpu) / seconds, 2),
        "commands_per_msg": {k: round(v / n, 3) for k, v in sorted(commands.items()) if v},
    }


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (target, mode, processes)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["mode"], r["processes"]), []).append(r)
    return [
        {
            "target": target,
            "mode": mode,
            "processes": procs,
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in group),
            "redis_us_per_msg": statistics.median(r["redis_us_per_msg"] for r in group),
            "redis_busiest": statistics.median(r["redis_busiest"] for r in group),
            "commands_per_msg": group[-1]["commands_per_msg"],
        }
        for (target, mode, procs), group in groups.items()
    ]


def main() -> None:
    """Run every measurement ``--runs`` times; print each, then the medians."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=8000, help="messages per measurement")
    p.add_argument("--size", type=int, default=2048, help="approximate message size, bytes")
    p.add_argument("--concurrency", type=int, default=50, help="producers per process")
    p.add_argument("--workers", default="1,2,4", help="Queue process counts to measure")
    p.add_argument("--modes", default="e2e,relay")
    p.add_argument("--targets", default="server,cluster")
    p.add_argument("--masters", type=int, default=3, help="cluster masters")
    p.add_argument("--replicas", type=int, default=0, help="replicas per cluster master")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json-out")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="smtpq-cluster-bench-"))
    targets = [Target(t, workdir, args.masters, args.replicas) for t in args.targets.split(",")]
    runs: list[dict[str, Any]] = []
    try:
        for target in targets:
            target.start()
        for r in range(args.runs):
            for target in targets:
                for mode in args.modes.split(","):
                    for procs in (int(w) for w in args.workers.split(",")):
                        runs.append(run(args, target, mode, procs))
                        print(json.dumps({"run": r + 1, **runs[-1]}), flush=True)
    finally:
        for target in targets:
            target.close()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(runs)
    print(
        f"\nmedians of {args.runs} runs, n={args.n}, {args.size} B, {args.concurrency} "
        f"producers/process; cluster: {args.masters} masters, {args.replicas} replicas each"
    )
    for s in summary:
        scripts = s["commands_per_msg"].get("evalsha", 0.0) + s["commands_per_msg"].get("eval", 0)
        print(
            f"  {s['target']:8s} {s['mode']:6s} P={s['processes']}  {s['msgs_per_s']:8.0f} msgs/s"
            f"  redis {s['redis_us_per_msg']:6.1f} us/msg, busiest {s['redis_busiest']:.0%}"
            f"  {scripts:.2f} scripts/msg"
        )
    if args.json_out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv, "cpus": os.cpu_count()}
        Path(args.json_out).write_text(
            json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1)
        )


if __name__ == "__main__":
    main()
