"""Scale benchmark (issue 7): a queue of a million deferred messages.

Populates a disk queue with N deferred messages (and a Redis queue with a tenth as many), then
measures, each time in fresh processes, what N costs the daemon compared with an (almost) empty
queue: start-up, memory per message, the cost of one more enqueue and of one more due delivery,
and the operators' ``smtpq queue list``. See bench/README.md ("Scale") for what each figure is.

    python bench/scale.py                      # disk 1,000,000 and redis 100,000 (+ empty peers)
    python bench/scale.py --quick              # disk 20,000 and redis 5,000: a few minutes
    python bench/scale.py -n 200000 --storage disk --workdir /tmp/scale --keep

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
#: How far back arrivals are spread, and how far ahead the next attempts: nothing is due.
ARRIVAL_SPREAD = 4 * DAY
NEXT_MIN, NEXT_SPREAD = 3600.0, 4 * DAY
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


def run_child(task: str, args: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``task`` in a fresh Python process; its JSON result (the last line it prints)."""
    done = subprocess.run(
        [sys.executable, __file__, "child", task, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {task} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def timed_command(command: Sequence[str], timeout: float = 3600) -> dict[str, Any]:
    """Run a command with its output discarded: wall time, peak RSS (ru_maxrss), exit code."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            raise RuntimeError(f"{command} timed out")
        time.sleep(0.01)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited {proc.returncode}: {stderr[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


# -- populating ----------------------------------------------------------------------------------


def disk_dirs(root: Path) -> tuple[Path, Path]:
    """The env and meta directories of the daemon's first shard under ``root``."""
    shard = root / "shard-0"
    return shard / "env", shard / "meta"


def check_disk_format(tmp: Path) -> None:
    """Fail unless the files written here are byte for byte what DiskStorage writes."""
    from smtpq.storage.disk import DiskStorage, _encode_meta, _Meta

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
            ours_meta = _encode_meta(
                _Meta(plan.next_attempt(3), plan.attempts(3), [], False, DEFERRED_REPLY.to_dict())
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
    from smtpq.storage.disk import _encode_meta, _Meta

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
            meta = _Meta(plan.next_attempt(i), plan.attempts(i), [], False, reply)
            # As DiskStorage commits a write: the envelope first, then the meta that makes
            # the message exist.
            for name, data, dfd in (
                (f"{id}.env", plan.envelope(i).to_bytes(), env_fd),
                (f"{id}.meta", _encode_meta(meta), meta_fd),
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
        if info["n"] == n:
            restore_disk(root, info)
            return info
        raise SystemExit(f"{root} holds a queue of {info['n']} messages, not {n}: use another")
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
    info = {"n": n, "t0": t0, "sample": sample[:samples], "populate_s": round(took, 1)}
    marker.write_text(json.dumps(info))
    return info


def restore_disk(root: Path, info: dict[str, Any]) -> None:
    """Write back the sample messages an earlier run delivered (same ids, same content)."""
    from smtpq.storage.disk import _encode_meta, _Meta

    env_dir, meta_dir = disk_dirs(root)
    plan = Plan(info["n"], info["t0"])
    reply = DEFERRED_REPLY.to_dict()
    for i, id in info["sample"]:
        meta = _Meta(plan.next_attempt(i), plan.attempts(i), [], False, reply)
        (env_dir / f"{id}.env").write_bytes(plan.envelope(i).to_bytes())
        (meta_dir / f"{id}.meta").write_bytes(_encode_meta(meta))
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


async def child_queue(args: dict[str, Any]) -> dict[str, Any]:
    """Through the Queue (library) with an instant relay: enqueue and due-delivery costs."""
    from smtpq.queue import Queue
    from smtpq.queue.driver import QueueEvent
    from smtpq.relay.base import Relay

    Relay.register(InstantRelay)
    store, opened = await open_storage(args["storage"])
    if args["storage"]["type"] == "redis":
        started = time.perf_counter()
        await store.load()  # lists every message: Redis needs no loading, this is for peers
        opened["load_list_s"] = round(time.perf_counter() - started, 2)
    k: int = args["k"]
    removed: dict[str, float] = {}
    event = asyncio.Event()

    def observe(e: QueueEvent) -> None:
        if e.kind == "removed":
            removed[e.id] = time.perf_counter()
            event.set()

    async def until_removed(ids: Sequence[str], timeout: float = 600) -> float:
        async with asyncio.timeout(timeout):
            while not all(i in removed for i in ids):
                event.clear()
                await event.wait()
        return max(removed[i] for i in ids)

    queue = Queue(store, InstantRelay(), hostname="mx.bench.example")  # type: ignore[arg-type]
    queue.observers.append(observe)
    result: dict[str, Any] = {"load": opened}
    async with queue:
        # One at a time: the latency of a durable write (and of its first attempt).
        latencies, ids = [], []
        for i in range(k):
            env = make_envelope(10**9 + i, time.time())
            t = time.perf_counter()
            [(_, id)] = await queue.enqueue(env)
            latencies.append(time.perf_counter() - t)
            assert isinstance(id, str), id
            ids.append(id)
        await until_removed(ids)
        result["enqueue_sequential"] = percentiles(latencies)
        # All at once: throughput, as concurrent SMTP sessions would load it.
        envs = [make_envelope(2 * 10**9 + i, time.time()) for i in range(k)]
        t = time.perf_counter()
        results = await asyncio.gather(*(queue.enqueue(e) for e in envs))
        stored = time.perf_counter() - t
        ids = [r for [(_, r)] in results if isinstance(r, str)]
        done = await until_removed(ids) - t
        result["enqueue_concurrent"] = {
            "stored_per_s": round(k / stored, 1),
            "delivered_per_s": round(k / done, 1),
        }
        # Due deliveries: deferred messages of the big queue made due by a flush.
        sample = [id for _, id in args["sample"]]
        t = time.perf_counter()
        flushed = await queue.flush(sample)
        done = await until_removed(sample) - t
        result["deliver_due"] = {
            "flushed": flushed,
            "seconds": round(done, 3),
            "per_s": round(len(sample) / done, 1),
            "ms_per_msg": round(done / len(sample) * 1000, 3),
        }
    result["size_after"] = (await store.get_info())["size"]
    await store.close()
    return result


CHILD_TASKS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
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

    def __init__(self, workdir: Path, storage: dict[str, Any], sink_port: int) -> None:
        self.port = free_port()
        self.config = workdir / f"smtpq-{storage['type']}.toml"
        self.log = workdir / f"daemon-{storage['type']}.log"
        queue_dir = storage["path"] if storage["type"] == "disk" else str(workdir / "redis-q")
        settings: dict[str, Any] = {
            "hostname": "mx.bench.example",
            "log_level": "info",
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


def daemon_stage(
    workdir: Path, storage: dict[str, Any], sample: Sequence[str], k: int, full_list: bool
) -> dict[str, Any]:
    """Start-up, SMTP enqueue, due delivery and listing through a running daemon."""
    from smtpq.daemon.client import AdminClient

    out: dict[str, Any] = {"loadavg_start": loadavg()}
    with Sink() as sink:
        daemon = Daemon(workdir, storage, sink.port)
        out["startup"] = daemon.start()
        try:
            # One session, one message at a time: the latency of one more enqueue.
            t = time.perf_counter()
            lat = smtp_enqueue(daemon.port, k, 1, 3 * 10**9)
            out["smtp_enqueue_sequential"] = percentiles(lat)
            sink.wait_for(k)
            # 10 sessions: throughput until the sink has them all.
            t = time.perf_counter()
            lat = smtp_enqueue(daemon.port, k, 10, 4 * 10**9)
            accepted = time.perf_counter() - t
            done = sink.wait_for(2 * k) - t
            out["smtp_enqueue_10_sessions"] = {
                **percentiles(lat),
                "accepted_per_s": round(k / accepted, 1),
                "delivered_per_s": round(k / done, 1),
            }
            # Due delivery: deferred messages made due by the operator's flush.
            client = AdminClient(daemon.admin_socket)
            t = time.perf_counter()
            reply = asyncio.run(client.post("/queue/flush", {"ids": list(sample)}))
            done = sink.wait_for(2 * k + len(sample)) - t
            out["deliver_due"] = {
                "flushed": reply["count"],
                "seconds": round(done, 3),
                "per_s": round(len(sample) / done, 1),
                "ms_per_msg": round(done / len(sample) * 1000, 3),
            }
            out["list_online"] = list_stage(daemon, full_list)
            out["rss_after_mb"] = round(daemon.status()["VmRSS"] / 2**20, 1)
            out["peak_rss_mb"] = round(daemon.status()["VmHWM"] / 2**20, 1)
        finally:
            out["stop_s"] = daemon.stop()
        out["list_offline"] = list_stage(daemon, full_list)
    out["loadavg_end"] = loadavg()
    return out


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


def disk_run(workdir: Path, n: int, k: int, sync: str, full_list: bool) -> dict[str, Any]:
    """Every measurement on a disk queue of ``n`` deferred messages."""
    root = workdir / f"disk-{n}"
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"storage": "disk", "n": n, "loadavg_start": loadavg()}
    info = populate_disk(root, n, 2 * k)
    out["populate_s"] = info["populate_s"]
    sample = [id for _, id in info["sample"]]
    spec = {"type": "disk", "path": str(root), "sync": sync}
    out["schedule"] = run_child("schedule", {"n": n})
    out["queue"] = run_child("queue", {"storage": spec, "k": k, "sample": info["sample"][:k]})
    out["daemon"] = daemon_stage(workdir, spec, sample[k:], k, full_list)
    out["loadavg_end"] = loadavg()
    restore_disk(root, info)
    return out


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


def redis_run(workdir: Path, url: str, n: int, k: int, full_list: bool) -> dict[str, Any]:
    """Every measurement on a Redis queue of ``n`` deferred messages."""
    prefix = f"scale{n}:"
    out: dict[str, Any] = {"storage": "redis", "n": n, "loadavg_start": loadavg()}
    before = redis_memory(url)
    info = asyncio.run(_populate_redis(url, prefix, n, 2 * k))
    out["populate_s"] = info["populate_s"]
    out["redis_bytes_per_msg"] = round((redis_memory(url) - before) / n, 1)
    spec = {"type": "redis", "url": url, "prefix": prefix}
    sample = [id for _, id in info["sample"]]
    out["queue"] = run_child("queue", {"storage": spec, "k": k, "sample": info["sample"][:k]})
    out["daemon"] = daemon_stage(workdir, spec, sample[k:], k, full_list)
    out["loadavg_end"] = loadavg()
    return out


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="disk queue size")
    parser.add_argument("--redis-n", type=int, default=100_000, help="redis queue size")
    parser.add_argument("-k", type=int, default=200, help="messages per enqueue/delivery test")
    parser.add_argument("--quick", action="store_true", help="-n 20000 --redis-n 5000 -k 100")
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
        opts.n, opts.redis_n, opts.k = 20_000, 5_000, 100
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
            for n in (2 * opts.k, opts.n):
                print(f"disk, {n:,} messages ...", flush=True)
                done(disk_run(workdir, n, opts.k, opts.sync, full))
        if "redis" in kinds:
            with redis_server(workdir) as url:
                for n in (2 * opts.k, opts.redis_n):
                    print(f"redis, {n:,} messages ...", flush=True)
                    done(redis_run(workdir, url, n, opts.k, full))
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
