"""Scale benchmark (issue 7): a queue of a million deferred messages.

Populates a disk queue with N deferred messages (and a Redis queue with a tenth as many), then
measures, each time in fresh processes, what N costs the daemon compared with an (almost) empty
queue: start-up, memory per message, the cost of one more enqueue and of one more due delivery,
and the operators' ``smtpq queue list``. See bench/README.md ("Scale") for what each figure is.

    python bench/scale.py                      # disk 1,000,000 and redis 100,000 (+ empty peers)
    python bench/scale.py --quick              # disk 20,000 and redis 5,000: a few minutes
    python bench/scale.py -n 200000 --storage disk --workdir bench/work/scale --keep

Only loopback is used; the private redis-server and the daemons are stopped by their pids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import multiprocessing
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.redis_server: the private redis-server helper

from smtpq.envelope import Envelope  # noqa: E402
from smtpq.reply import Reply  # noqa: E402
from smtpq.storage.base import QueueStorage, new_id  # noqa: E402

DAY = 86400.0
#: How far back arrivals are spread, and how far ahead the next attempts: nothing is due, for
#: days, so that a kept queue can be measured again (see REUSE_FOR).
ARRIVAL_SPREAD = 4 * DAY
NEXT_MIN, NEXT_SPREAD = 2 * DAY, 4 * DAY
#: A kept queue is reused this long after it was populated, and populated again after that:
#: later, some of its messages could fall due during a run, and the queue under test would
#: deliver them along with the messages it measures (and lose them).
REUSE_FOR = NEXT_MIN - 6 * 3600
PLAN_TIMES = {"arrival_spread": ARRIVAL_SPREAD, "next_min": NEXT_MIN, "next_spread": NEXT_SPREAD}
BODY = b"".join(b"Line %02d of a message body of about one kilobyte, like most mail.\r\n" % i
                for i in range(9))  # fmt: skip
DEFERRED_REPLY = Reply("451", "4.7.1 Greylisted, please try again later", "RCPT",
                       remote_host="mx.d.example.net")  # fmt: skip


# -- the messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The deterministic content of a populated queue: message ``i`` is a function of ``i``."""

    n: int
    t0: float  # when the queue was populated; arrivals are before it, next attempts after

    def arrival(self, i: int) -> float:
        """Arrival time of message ``i`` (spread over the last days, oldest first)."""
        return self.t0 - ARRIVAL_SPREAD + ARRIVAL_SPREAD * i / max(1, self.n)

    def next_attempt(self, i: int) -> float:
        """Next attempt time of message ``i``: in the future, scattered."""
        return self.t0 + NEXT_MIN + (i * 2654435761 % 1_000_003) / 1_000_003 * NEXT_SPREAD

    def attempts(self, i: int) -> int:
        """Attempts made so far."""
        return 1 + i % 3

    def envelope(self, i: int) -> Envelope:
        """Message ``i``: about 1 KB, one recipient."""
        return make_envelope(i, self.arrival(i))


def make_envelope(i: int, arrival: float) -> Envelope:
    """An envelope of about one kilobyte, as the edge would have stored it."""
    env = Envelope(f"sender{i % 997}@example.org", [f"user{i}@d{i % 101}.example.net"])
    head = (
        f"Received: from client.example.org (client.example.org [127.0.0.1])\r\n"
        f"\tby mx.bench.example with ESMTP id {i:x}; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
        f"From: Sender {i % 997} <sender{i % 997}@example.org>\r\n"
        f"To: <user{i}@d{i % 101}.example.net>\r\n"
        f"Subject: Scale benchmark message {i}\r\n"
        f"Message-ID: <{i}.bench@example.org>\r\n"
        f"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n\r\n"
    ).encode()
    env.parse(head + BODY)
    env.timestamp = arrival
    env.client = {"ip": "127.0.0.1", "host": None, "name": "client.example.org",
                  "protocol": "ESMTP", "auth": None}  # fmt: skip
    env.receiver = "mx.bench.example"
    return env


# -- process measurements ------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def disk_reads() -> int:
    """Bytes this process has had read from the disk (not from the page cache)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def loadavg() -> str:
    """The one-minute load average, and the share of the last minute in which some task
    waited for I/O (/proc/pressure/io): the machine is shared, its disk too."""
    try:
        with open("/proc/pressure/io") as f:
            io = f.readline().split()[2].partition("=")[2]
    except OSError:
        io = "?"
    return f"{os.getloadavg()[0]:.1f} (io {io}%)"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Median, 90th percentile and mean, in milliseconds."""
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def run_child(task: str, args: dict[str, Any], timeout: float = 3600) -> Any:
    """Run ``task`` in a fresh Python process; its JSON result (the last line it prints)."""
    done = subprocess.run(
        [sys.executable, __file__, "child", task, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {task} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Runs a command (its output discarded) and prints its wall time and rusage as JSON. Linux
# keeps a process's peak RSS across exec, and a child starts with its parent's: a command
# started by the bench process itself (hundreds of MB after populating) would report the
# bench's peak as its own. This wrapper is a small process of its own (python -S).
_MEASURE = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - started, "code": os.waitstatus_to_exitcode(status),
                  "maxrss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}))
"""


def timed_command(command: Sequence[str], timeout: float = 3600) -> dict[str, Any]:
    """Run a command with its output discarded: wall time, peak RSS (ru_maxrss), CPU time."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", _MEASURE, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"{command}: measuring failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out["code"] != 0:
        raise RuntimeError(f"{command} exited {out['code']}: {done.stderr[-2000:]}")
    return {
        "wall_s": round(out["wall"], 3),
        "peak_rss_mb": round(out["maxrss_kb"] / 1024, 1),
        "cpu_s": round(out["cpu"], 2),
    }


# -- populating ----------------------------------------------------------------------------------


def disk_dirs(root: Path) -> tuple[Path, Path]:
    """The env and meta directories of the daemon's first shard under ``root``."""
    shard = root / "shard-0"
    return shard / "env", shard / "meta"


def check_disk_format(tmp: Path) -> None:
    """Fail unless the files written here are byte for byte what DiskStorage writes."""
    from smtpq.storage.disk import DiskStorage
    from smtpq.storage.disk.meta import Meta, encode_meta

    async def through_storage() -> tuple[str, bytes, bytes]:
        store = DiskStorage(tmp / "env", tmp / "meta", sync="none")
        try:
            plan = Plan(10, time.time())
            id = await store.write(plan.envelope(3), plan.arrival(3))
            for _ in range(plan.attempts(3)):
                await store.increment_attempts(id)
            await store.set_timestamp(id, plan.next_attempt(3), last_reply=DEFERRED_REPLY)
            env = (tmp / "env" / f"{id}.env").read_bytes()
            meta = (tmp / "meta" / f"{id}.meta").read_bytes()
            ours_env = plan.envelope(3).to_bytes()
            ours_meta = encode_meta(
                Meta(plan.next_attempt(3), plan.attempts(3), [], False, DEFERRED_REPLY.to_dict())
            )
            return id, env + meta, ours_env + ours_meta
        finally:
            await store.close()

    id, theirs, ours = asyncio.run(through_storage())
    if theirs != ours:
        raise AssertionError(f"populated files differ from DiskStorage's for {id}")
    for sub in ("env", "meta"):
        mode = (tmp / sub / f"{id}.{sub}").stat().st_mode & 0o777
        if mode != 0o600:
            raise AssertionError(f"DiskStorage wrote mode {mode:o}; populate writes 600")


def _write_disk_range(job: tuple[str, str, float, int, int, int, int]) -> list[list[Any]]:
    """Write messages ``start..stop`` of a plan as files (one worker process)."""
    from smtpq.storage.disk.meta import Meta, encode_meta

    env_dir, meta_dir, t0, n, start, stop, sample_every = job
    plan = Plan(n, t0)
    reply = DEFERRED_REPLY.to_dict()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    env_fd = os.open(env_dir, os.O_RDONLY | os.O_DIRECTORY)
    meta_fd = os.open(meta_dir, os.O_RDONLY | os.O_DIRECTORY)
    sample: list[list[Any]] = []
    try:
        for i in range(start, stop):
            arrival = plan.arrival(i)
            id = new_id(arrival)
            meta = Meta(plan.next_attempt(i), plan.attempts(i), [], False, reply)
            # As DiskStorage commits a write: the envelope first, then the meta that makes
            # the message exist.
            for name, data, dfd in (
                (f"{id}.env", plan.envelope(i).to_bytes(), env_fd),
                (f"{id}.meta", encode_meta(meta), meta_fd),
            ):
                fd = os.open(name, flags, 0o600, dir_fd=dfd)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            if sample_every and i % sample_every == 0:
                sample.append([i, id])
    finally:
        os.close(env_fd)
        os.close(meta_fd)
    return sample


def populate_disk(root: Path, n: int, samples: int) -> dict[str, Any]:
    """N deferred messages in a fresh queue directory (shard 0), written by 2 processes.

    Returns the plan and a sample of ids (spread over the queue) for the delivery tests.
    """
    from smtpq.storage.disk import DiskStorage

    marker = root / "populated.json"
    if marker.exists():
        info: dict[str, Any] = json.loads(marker.read_text())
        if info["n"] != n:
            raise SystemExit(f"{root} holds a queue of {info['n']} messages, not {n}: use another")
        if info.get("plan") != PLAN_TIMES:
            print(f"{root}: populated with other times: again", flush=True)
        elif time.time() - info["t0"] < REUSE_FOR:
            if len(info["sample"]) < samples:  # an earlier run with fewer: sample more
                info["sample"] += resample_disk(root, info, samples - len(info["sample"]))
                marker.write_text(json.dumps(info))
            restore_disk(root, info)
            stored = count_disk(root)
            if stored == n:
                return info
            print(f"{root}: {stored:,} messages stored, not {n:,}: populating again", flush=True)
        else:
            print(f"{root}: populated too long ago (messages may be due): again", flush=True)
        marker.unlink()
        shutil.rmtree(root / "shard-0")
    check_disk_format(Path(tempfile.mkdtemp(prefix="scale-format-", dir=root.parent)))
    env_dir, meta_dir = disk_dirs(root)

    async def make_dirs() -> None:  # the directories as DiskStorage creates them (0700)
        store = DiskStorage(env_dir, meta_dir, sync="none")
        await store.load()
        await store.close()

    asyncio.run(make_dirs())
    t0 = time.time()
    sample_every = max(1, n // samples) if samples else 0
    chunk = 20_000
    jobs = [
        (str(env_dir), str(meta_dir), t0, n, s, min(n, s + chunk), sample_every)
        for s in range(0, n, chunk)
    ]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        sample = [row for part in pool.map(_write_disk_range, jobs) for row in part]
    took = time.perf_counter() - started
    # Written back before anything is measured: gigabytes of dirty pages being written back
    # would slow down every durable write and every read of the run.
    os.sync()
    info = {"n": n, "t0": t0, "sample": sample[:samples], "populate_s": round(took, 1),
            "plan": PLAN_TIMES}  # fmt: skip
    marker.write_text(json.dumps(info))
    return info


def count_disk(root: Path) -> int:
    """The messages stored in a populated queue (its meta files)."""
    with os.scandir(disk_dirs(root)[1]) as it:
        return sum(1 for entry in it if entry.name.endswith(".meta"))


def resample_disk(root: Path, info: dict[str, Any], more: int) -> list[list[Any]]:
    """``more`` messages of a populated queue that are not in its sample yet, as ``[i, id]``
    (``i`` read back from the Message-ID of the envelope)."""
    env_dir, meta_dir = disk_dirs(root)
    taken = {id for _, id in info["sample"]}
    found: list[list[Any]] = []
    with os.scandir(meta_dir) as it:
        for entry in it:
            id = entry.name[:-5]
            if not entry.name.endswith(".meta") or id in taken:
                continue
            env = Envelope.from_bytes((env_dir / f"{id}.env").read_bytes())
            i = int(env.headers["Message-ID"].strip("<>").split(".")[0])
            found.append([i, id])
            if len(found) == more:
                break
    return found


def restore_disk(root: Path, info: dict[str, Any]) -> None:
    """Write back the sample messages an earlier run delivered (same ids, same content)."""
    from smtpq.storage.disk.meta import Meta, encode_meta

    env_dir, meta_dir = disk_dirs(root)
    plan = Plan(info["n"], info["t0"])
    reply = DEFERRED_REPLY.to_dict()
    for i, id in info["sample"]:
        meta = Meta(plan.next_attempt(i), plan.attempts(i), [], False, reply)
        (env_dir / f"{id}.env").write_bytes(plan.envelope(i).to_bytes())
        (meta_dir / f"{id}.meta").write_bytes(encode_meta(meta))
        for sub in (env_dir / f"{id}.env", meta_dir / f"{id}.meta"):
            sub.chmod(0o600)


async def _populate_redis(url: str, prefix: str, n: int, samples: int) -> dict[str, Any]:
    from smtpq.storage.redis import RedisStorage

    store = RedisStorage.from_url(url, prefix=prefix)
    plan = Plan(n, time.time())
    sample_every = max(1, n // samples) if samples else 0
    sample: list[list[Any]] = []

    async def one(i: int) -> None:
        id = await store.write(plan.envelope(i), plan.arrival(i))
        for _ in range(plan.attempts(i)):
            await store.increment_attempts(id)
        await store.set_timestamp(id, plan.next_attempt(i), last_reply=DEFERRED_REPLY)
        if sample_every and i % sample_every == 0:
            sample.append([i, id])

    try:
        started = time.perf_counter()
        for start in range(0, n, 500):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 500))))
        took = time.perf_counter() - started
    finally:
        await store.close()
    sample.sort()
    return {"n": n, "t0": plan.t0, "sample": sample[:samples], "populate_s": round(took, 1)}


def redis_memory(url: str) -> int:
    """Redis's used_memory, in bytes."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


# -- child tasks (each in a fresh process) -------------------------------------------------------


def _storage_from(spec: dict[str, Any]) -> QueueStorage:
    from smtpq.storage.disk import DiskStorage
    from smtpq.storage.redis import RedisStorage

    if spec["type"] == "disk":
        env_dir, meta_dir = disk_dirs(Path(spec["path"]))
        return DiskStorage(env_dir, meta_dir, sync=spec.get("sync", "fsync"))
    return RedisStorage.from_url(spec["url"], prefix=spec["prefix"])


async def open_storage(spec: dict[str, Any]) -> tuple[QueueStorage, dict[str, Any]]:
    """Open a stored queue as the daemon does at start-up (its first ``get_info()`` loads a
    disk queue's schedule): the storage, and the time and RSS that took."""
    gc.collect()
    before = proc_status()
    store = _storage_from(spec)
    started = time.perf_counter()
    info = await store.get_info()
    took = time.perf_counter() - started
    gc.collect()
    after = proc_status()
    count = info["size"]
    return store, {
        "messages": count,
        "load_s": round(took, 2),
        "rss_before_mb": round(before["VmRSS"] / 2**20, 1),
        "rss_after_mb": round(after["VmRSS"] / 2**20, 1),
        "peak_rss_mb": round(after["VmHWM"] / 2**20, 1),
        "bytes_per_msg": round((after["VmRSS"] - before["VmRSS"]) / max(1, count), 1),
        "peak_bytes_per_msg": round((after["VmHWM"] - before["VmRSS"]) / max(1, count), 1),
    }


async def child_schedule(args: dict[str, Any]) -> dict[str, Any]:
    """The LocalSchedule alone with N deferred messages: its bytes per message."""
    from smtpq.storage.schedule import LocalSchedule

    n = args["n"]
    plan = Plan(n, time.time())
    gc.collect()
    before = proc_status()["VmRSS"]
    schedule = LocalSchedule()
    started = time.perf_counter()
    for i in range(n):
        schedule.add(new_id(plan.arrival(i)), plan.next_attempt(i))
    took = time.perf_counter() - started
    gc.collect()
    after = proc_status()["VmRSS"]
    assert len(schedule) == n
    return {
        "messages": n,
        "add_s": round(took, 2),
        "rss_mb": round(after / 2**20, 1),
        "bytes_per_msg": round((after - before) / max(1, n), 1),
    }


class InstantRelay:
    """A relay that delivers everything at once: the queue's own costs, without SMTP."""

    async def attempt(self, envelope: Envelope, attempts: int) -> None:
        """Delivered."""

    async def close(self) -> None:
        """Nothing to release."""


def evict_messages(spec: dict[str, Any], ids: Sequence[str]) -> None:
    """Drop the files of messages ``ids`` of a disk queue from the page cache: in a big queue a
    deferred message's files are not in memory when it falls due, so in the small peer queue
    they must not be either (nothing to do for Redis, which keeps everything in memory)."""
    if spec["type"] != "disk":
        return
    for directory, suffix in zip(disk_dirs(Path(spec["path"])), (".env", ".meta"), strict=True):
        for id in ids:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(directory / f"{id}{suffix}", os.O_RDONLY | os.O_NOATIME)
                os.fdatasync(fd)  # written back first (restore_disk): dirty pages stay
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


class QueueProbe:
    """A Queue with an instant relay over one stored queue, and its measurements."""

    def __init__(self, store: QueueStorage, spec: dict[str, Any], sample: list[str]) -> None:
        from smtpq.queue import Queue
        from smtpq.relay.base import Relay

        Relay.register(InstantRelay)
        self.spec = spec
        self.sample = sample
        self.queue = Queue(store, InstantRelay(), hostname="mx.bench.example")  # type: ignore[arg-type]
        self.queue.observers.append(self._observe)
        self.removed: dict[str, float] = {}
        self._event = asyncio.Event()
        self.latencies: list[float] = []
        self.stored_per_s: list[float] = []
        self.delivered_per_s: list[float] = []
        self.due_ms: list[float] = []
        # Disk reads per message of each test: what a cold page cache costs (directories,
        # inodes and files the small queue has in memory and the big one has not).
        self.reads: dict[str, list[float]] = {"enqueue": [], "due": []}
        self._serial = 0

    def _observe(self, event: Any) -> None:
        if event.kind == "removed":
            self.removed[event.id] = time.perf_counter()
            self._event.set()

    async def _until_removed(self, ids: Sequence[str], timeout: float = 600) -> float:
        async with asyncio.timeout(timeout):
            while not all(i in self.removed for i in ids):
                self._event.clear()
                await self._event.wait()
        return max(self.removed[i] for i in ids)

    def _envelope(self) -> Envelope:
        self._serial += 1
        return make_envelope(10**9 + self._serial, time.time())

    async def round(self, k: int, turn: int) -> None:
        """``k`` enqueues one at a time, ``k`` at once, ``k`` due deliveries."""
        read = disk_reads()
        ids = []
        for _ in range(k):
            env = self._envelope()
            t = time.perf_counter()
            [(_, id)] = await self.queue.enqueue(env)
            self.latencies.append(time.perf_counter() - t)
            assert isinstance(id, str), id
            ids.append(id)
        await self._until_removed(ids)
        envs = [self._envelope() for _ in range(k)]
        t = time.perf_counter()
        results = await asyncio.gather(*(self.queue.enqueue(e) for e in envs))
        stored = time.perf_counter() - t
        ids = [r for [(_, r)] in results if isinstance(r, str)]
        done = await self._until_removed(ids) - t
        self.stored_per_s.append(k / stored)
        self.delivered_per_s.append(k / done)
        self.reads["enqueue"].append((disk_reads() - read) / (2 * k))
        due = self.sample[turn * k : (turn + 1) * k]
        evict_messages(self.spec, due)
        read = disk_reads()
        t = time.perf_counter()
        await self.queue.flush(due)
        done = await self._until_removed(due) - t
        self.due_ms.append(done / len(due) * 1000)
        self.reads["due"].append((disk_reads() - read) / len(due))

    def figures(self) -> dict[str, Any]:
        """Medians over the rounds."""
        return {
            "enqueue_sequential": percentiles(self.latencies),
            "enqueue_concurrent": {
                "stored_per_s": round(statistics.median(self.stored_per_s), 1),
                "delivered_per_s": round(statistics.median(self.delivered_per_s), 1),
            },
            "deliver_due": {"ms_per_msg": round(statistics.median(self.due_ms), 3)},
            "disk_read_kb_per_msg": {
                test: round(statistics.median(values) / 1024, 1)
                for test, values in self.reads.items()
            },
        }


async def child_queue(args: dict[str, Any]) -> list[dict[str, Any]]:
    """Through the Queue (library) with an instant relay, on the big queue and its small peer
    in one process, in alternating rounds (so that both see the same machine): the cost of
    enqueues and of due deliveries. The big queue is opened first, for its load figures."""
    specs: list[dict[str, Any]] = args["storages"]
    k, rounds = args["k"], args["rounds"]
    opened: list[tuple[QueueStorage, dict[str, Any]]] = []
    for spec in reversed(specs):
        opened.insert(0, await open_storage(spec))
        if spec["type"] == "redis":
            started = time.perf_counter()
            await opened[0][0].load()  # lists every message: Redis needs no loading
            opened[0][1]["load_list_s"] = round(time.perf_counter() - started, 2)
    probes = [
        QueueProbe(store, spec, sample)
        for (store, _), spec, sample in zip(opened, specs, args["samples"], strict=True)
    ]
    for probe in probes:
        await probe.queue.start()
    for turn in range(rounds):
        for probe in probes if turn % 2 == 0 else probes[::-1]:
            await probe.round(k, turn)
    results = []
    for probe, (store, load) in zip(probes, opened, strict=True):
        await probe.queue.stop()
        results.append(
            {"load": load, **probe.figures(), "size_after": (await store.get_info())["size"]}
        )
        await store.close()
    return results


async def child_open(args: dict[str, Any]) -> dict[str, Any]:
    """Only open (load) a stored queue: :func:`open_storage`'s figures."""
    store, opened = await open_storage(args["storage"])
    await store.close()
    return opened


CHILD_TASKS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]] = {
    "open": child_open,
    "schedule": child_schedule,
    "queue": child_queue,
}


# -- the daemon ----------------------------------------------------------------------------------


class Sink:
    """An SMTP sink (aiosmtpd, in its own thread) that counts the messages it accepts."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self.count = 0
        self._lock = threading.Lock()
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                with sink._lock:
                    sink.count += 1
                return "250 2.0.0 Ok: queued"

        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def wait_for(self, count: int, timeout: float = 600) -> float:
        """Block until ``count`` messages arrived; the monotonic time it happened."""
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink has {self.count} of {count} messages")
            time.sleep(0.002)
        return time.perf_counter()


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, number or list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, settings: dict[str, Any]) -> None:
    """Nested dicts as TOML tables (one level)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for section, table in settings.items():
        if isinstance(table, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """``smtpq serve`` on a populated queue, stopped by its pid."""

    def __init__(self, workdir: Path, storage: dict[str, Any], sink_port: int, name: str) -> None:
        self.port = free_port()
        self.config = workdir / f"smtpq-{name}.toml"
        self.log = workdir / f"daemon-{name}.log"
        queue_dir = storage.get("path") or str(workdir / f"admin-{name}")
        settings: dict[str, Any] = {
            "hostname": "mx.bench.example",
            "log_level": "info",
            "workers": 1,  # the recorded figures are one process's (the default is one per core)
            "edge": {"listen": [f"127.0.0.1:{self.port}"], "reverse_lookup": False},
            "storage": {"type": storage["type"], "path": queue_dir},
            "relay": {"type": "smarthost", "host": "127.0.0.1", "port": sink_port},
            "smtp": {"tls": "none"},
        }
        if storage["type"] == "disk":
            settings["storage"]["sync"] = storage.get("sync", "fsync")
        else:
            settings["storage"].update(url=storage["url"], prefix=storage["prefix"])
        write_config(self.config, settings)
        self.admin_socket = Path(queue_dir) / ("shard-0" if storage["type"] == "disk" else "")
        self.admin_socket = self.admin_socket / "admin.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> list[str]:
        """An ``smtpq`` command line on this daemon's configuration."""
        return [sys.executable, "-m", "smtpq.daemon.cli", *args, "-c", str(self.config)]

    def start(self, timeout: float = 900) -> dict[str, Any]:
        """Start; times until the SMTP port accepts and until the queue is loaded, and RSS."""
        log = open(self.log, "wb")  # noqa: SIM115 - kept open for the daemon's lifetime
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpq.daemon.cli", "serve", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        accept = loaded = None
        deadline = started + timeout
        while accept is None or loaded is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.log.read_text()[-3000:]}")
            if time.perf_counter() > deadline:
                raise TimeoutError("the daemon did not start")
            if accept is None:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
                ):
                    if s.recv(3) == b"220":
                        accept = time.perf_counter() - started
            if loaded is None and " loaded: " in self.log.read_text(errors="replace"):
                loaded = time.perf_counter() - started
            time.sleep(0.01)
        status = proc_status(self.proc.pid)
        return {
            "accepting_s": round(accept, 2),
            "loaded_s": round(loaded, 2),
            "rss_mb": round(status["VmRSS"] / 2**20, 1),
            "peak_rss_mb": round(status["VmHWM"] / 2**20, 1),
        }

    def status(self) -> dict[str, int]:
        """The daemon's VmRSS and VmHWM."""
        assert self.proc is not None
        return proc_status(self.proc.pid)

    def stop(self) -> float:
        """SIGTERM by pid; seconds until it exited."""
        assert self.proc is not None
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return round(time.perf_counter() - started, 2)


def smtp_enqueue(port: int, count: int, sessions: int, first: int) -> list[float]:
    """Send ``count`` messages over ``sessions`` connections; each message's latency (MAIL to
    the 250 after DATA)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def session(index: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            client.ehlo("client.example.org")
            for j in range(index, count, sessions):
                env = make_envelope(first + j, time.time())
                head, body = env.flatten()
                t = time.perf_counter()
                client.sendmail(env.sender, env.recipients, head + body)
                took = time.perf_counter() - t
                with lock:
                    latencies.append(took)

    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(session, range(sessions)))
    return latencies


def daemon_pair(
    workdir: Path,
    specs: list[dict[str, Any]],
    samples: list[list[str]],
    k: int,
    rounds: int,
    full_list: bool,
) -> list[dict[str, Any]]:
    """Two daemons, on the small and the big queue: start-up of each, then SMTP enqueues and
    due deliveries in alternating rounds, then listings with the daemons up and down."""
    from smtpq.daemon.client import AdminClient

    outs: list[dict[str, Any]] = [{"loadavg_start": loadavg()} for _ in specs]
    with Sink() as sink:
        daemons = [
            Daemon(workdir, spec, sink.port, f"{spec['type']}-{i}") for i, spec in enumerate(specs)
        ]
        try:
            for daemon, out in zip(daemons, outs, strict=True):
                out["startup"] = daemon.start()
            lat: list[list[float]] = [[], []]
            rates: list[list[float]] = [[], []]
            due: list[list[float]] = [[], []]
            for turn in range(rounds):
                for i in (0, 1) if turn % 2 == 0 else (1, 0):
                    daemon, first = daemons[i], (turn * 2 + i) * 10**6
                    # One session, one message at a time: the latency of one more enqueue.
                    expected = sink.count + k
                    lat[i] += smtp_enqueue(daemon.port, k, 1, first)
                    sink.wait_for(expected)
                    # 10 sessions: throughput until the sink has them all.
                    t = time.perf_counter()
                    smtp_enqueue(daemon.port, k, 10, first + k)
                    rates[i].append(k / (sink.wait_for(expected + k) - t))
                    # Due deliveries: deferred messages made due by the operator's flush.
                    ids = samples[i][turn * k : (turn + 1) * k]
                    evict_messages(specs[i], ids)
                    t = time.perf_counter()
                    asyncio.run(AdminClient(daemon.admin_socket).post("/queue/flush", {"ids": ids}))
                    due[i].append((sink.wait_for(expected + k + len(ids)) - t) / len(ids) * 1000)
            for i, (daemon, out) in enumerate(zip(daemons, outs, strict=True)):
                out["smtp_enqueue_sequential"] = percentiles(lat[i])
                out["smtp_enqueue_10_sessions"] = {
                    "delivered_per_s": round(statistics.median(rates[i]), 1)
                }
                out["deliver_due"] = {"ms_per_msg": round(statistics.median(due[i]), 3)}
                out["list_online"] = list_stage(daemon, full_list)
                status = daemon.status()
                out["rss_after_mb"] = round(status["VmRSS"] / 2**20, 1)
                out["peak_rss_mb"] = round(status["VmHWM"] / 2**20, 1)
        finally:
            for daemon, out in zip(daemons, outs, strict=True):
                if daemon.proc is not None:
                    out["stop_s"] = daemon.stop()
        for daemon, out in zip(daemons, outs, strict=True):
            out["list_offline"] = list_stage(daemon, full_list)
            out["loadavg_end"] = loadavg()
    return outs


def list_stage(daemon: Daemon, full_list: bool) -> dict[str, Any]:
    """``smtpq queue list --limit 100`` and ``--json`` (whole queue), timed."""
    out: dict[str, Any] = {}
    commands = {"limit_100": daemon.cli("queue", "list", "--limit", "100")}
    if full_list:
        commands["json_all"] = daemon.cli("queue", "list", "--json")
    for name, command in commands.items():
        before = daemon.status() if daemon.proc and daemon.proc.poll() is None else None
        out[name] = timed_command(command)
        if before is not None:
            after = daemon.status()
            out[name]["daemon_rss_growth_mb"] = round((after["VmRSS"] - before["VmRSS"]) / 2**20, 1)
            out[name]["daemon_peak_rss_mb"] = round(after["VmHWM"] / 2**20, 1)
    return out


# -- the whole run -------------------------------------------------------------------------------


def disk_pair(
    workdir: Path, n: int, k: int, rounds: int, sync: str, full_list: bool
) -> list[dict[str, Any]]:
    """Every measurement on a disk queue of ``n`` deferred messages and on its small peer."""
    outs: list[dict[str, Any]] = []
    infos, specs = [], []
    for size in (2 * rounds * k, n):
        root = workdir / f"disk-{size}"
        root.mkdir(parents=True, exist_ok=True)
        info = populate_disk(root, size, 2 * rounds * k)
        infos.append(info)
        specs.append({"type": "disk", "path": str(root), "sync": sync})
        outs.append({"storage": "disk", "n": size, "populate_s": info["populate_s"]})
    samples = [[id for _, id in info["sample"]] for info in infos]
    outs[1]["schedule"] = run_child("schedule", {"n": n})
    outs[0]["schedule"] = run_child("schedule", {"n": 2 * rounds * k})
    args = {"storages": specs, "k": k, "rounds": rounds, "samples": [s[::2] for s in samples]}
    for out, queue in zip(outs, run_child("queue", args), strict=True):
        out["queue"] = queue
    daemon = daemon_pair(workdir, specs, [s[1::2] for s in samples], k, rounds, full_list)
    for out, result in zip(outs, daemon, strict=True):
        out["daemon"] = result
        out["loadavg_start"], out["loadavg_end"] = result["loadavg_start"], result["loadavg_end"]
    for spec, info in zip(specs, infos, strict=True):
        restore_disk(Path(spec["path"]), info)
    return outs


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port (no persistence); its URL."""
    from tests.redis_server import RedisServer

    server = RedisServer(workdir / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.close()


def redis_pair(
    workdir: Path, url: str, n: int, k: int, rounds: int, full_list: bool
) -> list[dict[str, Any]]:
    """Every measurement on a Redis queue of ``n`` deferred messages and on its small peer."""
    outs: list[dict[str, Any]] = []
    infos, specs = [], []
    for size in (2 * rounds * k, n):
        before = redis_memory(url)
        prefix = f"scale{size}:"
        info = asyncio.run(_populate_redis(url, prefix, size, 2 * rounds * k))
        infos.append(info)
        specs.append({"type": "redis", "url": url, "prefix": prefix})
        outs.append({
            "storage": "redis", "n": size, "populate_s": info["populate_s"],
            "redis_bytes_per_msg": round((redis_memory(url) - before) / size, 1),
        })  # fmt: skip
    samples = [[id for _, id in info["sample"]] for info in infos]
    args = {"storages": specs, "k": k, "rounds": rounds, "samples": [s[::2] for s in samples]}
    for out, queue in zip(outs, run_child("queue", args), strict=True):
        out["queue"] = queue
    daemon = daemon_pair(workdir, specs, [s[1::2] for s in samples], k, rounds, full_list)
    for out, result in zip(outs, daemon, strict=True):
        out["daemon"] = result
        out["loadavg_start"], out["loadavg_end"] = result["loadavg_start"], result["loadavg_end"]
    return outs


def summary(results: list[dict[str, Any]]) -> str:
    """A Markdown table: each figure at each size, and the ratio big/empty."""
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("populate s", lambda r: r["populate_s"]),
        ("load s (first get_info)", lambda r: r["queue"]["load"]["load_s"]),
        ("load RSS growth B/msg", lambda r: r["queue"]["load"]["bytes_per_msg"]),
        ("load peak B/msg", lambda r: r["queue"]["load"]["peak_bytes_per_msg"]),
        ("LocalSchedule alone B/msg", lambda r: r.get("schedule", {}).get("bytes_per_msg")),
        ("serve: SMTP accepting s", lambda r: r["daemon"]["startup"]["accepting_s"]),
        ("serve: queue loaded s", lambda r: r["daemon"]["startup"]["loaded_s"]),
        ("serve: RSS MB when loaded", lambda r: r["daemon"]["startup"]["rss_mb"]),
        ("serve: peak RSS MB at start", lambda r: r["daemon"]["startup"]["peak_rss_mb"]),
        ("Queue enqueue 1-by-1 median ms", lambda r: r["queue"]["enqueue_sequential"]["median_ms"]),
        (
            "Queue enqueue all-at-once msg/s",
            lambda r: r["queue"]["enqueue_concurrent"]["stored_per_s"],
        ),
        ("Queue due delivery ms/msg", lambda r: r["queue"]["deliver_due"]["ms_per_msg"]),
        (
            "Queue disk reads KB/msg: enqueue",
            lambda r: r["queue"]["disk_read_kb_per_msg"]["enqueue"],
        ),
        (
            "Queue disk reads KB/msg: due delivery",
            lambda r: r["queue"]["disk_read_kb_per_msg"]["due"],
        ),
        (
            "SMTP enqueue 1 session median ms",
            lambda r: r["daemon"]["smtp_enqueue_sequential"]["median_ms"],
        ),
        (
            "SMTP 10 sessions delivered msg/s",
            lambda r: r["daemon"]["smtp_enqueue_10_sessions"]["delivered_per_s"],
        ),
        ("daemon due delivery ms/msg", lambda r: r["daemon"]["deliver_due"]["ms_per_msg"]),
        (
            "list --limit 100, daemon up: s",
            lambda r: r["daemon"]["list_online"]["limit_100"]["wall_s"],
        ),
        (
            "list --json all, daemon up: s",
            lambda r: r["daemon"]["list_online"].get("json_all", {}).get("wall_s"),
        ),
        (
            "list --json all, daemon up: daemon RSS growth MB",
            lambda r: r["daemon"]["list_online"].get("json_all", {}).get("daemon_rss_growth_mb"),
        ),
        (
            "list --limit 100, no daemon: s",
            lambda r: r["daemon"]["list_offline"]["limit_100"]["wall_s"],
        ),
        (
            "list --limit 100, no daemon: peak RSS MB",
            lambda r: r["daemon"]["list_offline"]["limit_100"]["peak_rss_mb"],
        ),
        (
            "list --json all, no daemon: s",
            lambda r: r["daemon"]["list_offline"].get("json_all", {}).get("wall_s"),
        ),
        (
            "list --json all, no daemon: peak RSS MB",
            lambda r: r["daemon"]["list_offline"].get("json_all", {}).get("peak_rss_mb"),
        ),
        ("daemon stop s", lambda r: r["daemon"]["stop_s"]),
        ("load average start", lambda r: r["loadavg_start"]),
        ("load average end", lambda r: r["loadavg_end"]),
    ]
    lines = []
    for kind in ("disk", "redis"):
        group = sorted((r for r in results if r["storage"] == kind), key=lambda r: r["n"])
        if not group:
            continue
        head = " | ".join(f"{r['n']:,}" for r in group)
        lines += [f"\n{kind}:\n", f"| figure | {head} | ratio |",
                  "|---" * (len(group) + 2) + "|"]  # fmt: skip
        for name, get in rows:
            values = []
            for r in group:
                try:
                    values.append(get(r))
                except KeyError:
                    values.append(None)
            if all(v is None for v in values):
                continue
            ratio = ""
            a, b = values[0], values[-1]
            if isinstance(a, int | float) and isinstance(b, int | float) and a:
                ratio = f"{b / a:.2f}"
            cells = " | ".join("-" if v is None else f"{v}" for v in values)
            lines.append(f"| {name} | {cells} | {ratio} |")
    return "\n".join(lines)


def evict(root: Path) -> float:
    """Drop the queue files' pages from the page cache (POSIX_FADV_DONTNEED, file by file: no
    other program's cache is touched), so that the next load reads them from the disk."""
    started = time.perf_counter()
    for sub in disk_dirs(root):
        dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(sub) as it:
                for entry in it:
                    if entry.is_file(follow_symlinks=False):
                        fd = os.open(entry.name, os.O_RDONLY | os.O_NOATIME, dir_fd=dfd)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.close(fd)
        finally:
            os.close(dfd)
    return time.perf_counter() - started


def load_ab(argv: Sequence[str]) -> int:
    """``scale.py load-ab``: the load of one disk queue by two versions of smtpq, alternately,
    each from a cold page cache (its files evicted first) and then warm."""
    parser = argparse.ArgumentParser(prog="scale.py load-ab", description=load_ab.__doc__)
    parser.add_argument("queue", type=Path, help="a queue populated by scale.py (disk-N)")
    parser.add_argument("--src", type=Path, nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args(argv)
    spec = {"type": "disk", "path": str(opts.queue)}
    for turn in range(opts.rounds):
        for src in opts.src:
            os.environ["PYTHONPATH"] = str(src.resolve())
            for cache in ("cold", "warm"):
                evicted = evict(opts.queue) if cache == "cold" else 0.0
                row = {"round": turn, "src": str(src), "cache": cache, "start": loadavg()}
                row.update(run_child("open", {"storage": spec}))
                row.update(end=loadavg(), evict_s=round(evicted, 1))
                print(json.dumps(row), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the benchmark (or one child task)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        result = asyncio.run(CHILD_TASKS[argv[1]](json.loads(argv[2])))
        print(json.dumps(result))
        return 0
    if argv[:1] == ["load-ab"]:
        return load_ab(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="disk queue size")
    parser.add_argument("--redis-n", type=int, default=100_000, help="redis queue size")
    parser.add_argument("-k", type=int, default=100, help="messages per test and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per test")
    parser.add_argument("--quick", action="store_true", help="-n 20000 --redis-n 5000 -k 50")
    parser.add_argument("--storage", default="disk,redis", help="disk, redis or both")
    parser.add_argument("--sync", default="fsync", choices=["fsync", "syncfs", "none"])
    parser.add_argument("--no-full-list", action="store_true", help="skip list --json of all")
    parser.add_argument("--workdir", type=Path, help="default: a new directory in /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (reuse queues)")
    parser.add_argument("--json-out", type=Path, help="write every figure here")
    parser.add_argument(
        "--src",
        type=Path,
        help="run the daemon, the commands and the children on the smtpq "
        "package in this src directory (e.g. an older checkout, for before/after figures)",
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.n, opts.redis_n, opts.k = 20_000, 5_000, 50
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="smtpq-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = set(opts.storage.split(","))
    if opts.src:
        os.environ["PYTHONPATH"] = str(opts.src.resolve())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"smtpq scale benchmark, {stamp}, workdir {workdir}, load average {loadavg()}")
    print(f"command: {' '.join(sys.argv)}", flush=True)
    results: list[dict[str, Any]] = []
    full = not opts.no_full_list

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        if opts.json_out:  # after every run: a long run that fails later keeps its figures
            opts.json_out.write_text(json.dumps({"date": stamp, "results": results}, indent=1))
        print(json.dumps(result), flush=True)

    try:
        if "disk" in kinds:
            print(f"disk, {opts.n:,} messages and {opts.rounds * opts.k} ...", flush=True)
            for result in disk_pair(workdir, opts.n, opts.k, opts.rounds, opts.sync, full):
                done(result)
        if "redis" in kinds:
            with redis_server(workdir) as url:
                print(f"redis, {opts.redis_n:,} messages and {opts.rounds * opts.k} ...")
                for result in redis_pair(workdir, url, opts.redis_n, opts.k, opts.rounds, full):
                    done(result)
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
