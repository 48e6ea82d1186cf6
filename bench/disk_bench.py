"""DiskStorage throughput beside the machine's own limit and python-slimta's DiskStorage.

One command (from the repository root, after ``make`` has made ``.venv``)::

    .venv/bin/python bench/disk_bench.py            # --runs 3 -n 2000 --size 2048

What runs, each measurement in a fresh child process, N messages of about SIZE bytes:

* ``raw``: the disk's limit for this layout, a plain loop without smtpq: per message an
  envelope file (the size of an smtpq envelope) and a 100-byte meta file, each written and
  fsynced in a scratch directory, renamed into place, and each target directory fsynced. With
  batch 1 that is one message at a time; with batch B, B messages share the directory fsyncs
  (the files are still fsynced one after the other), as B concurrent writers at most could.
* ``smtpq-write``: DiskStorage.write from C concurrent writers (asyncio tasks), durable: with
  the default ``sync="auto"`` (syncfs on Linux 5.8+) and with ``sync="fsync"``.
* ``slimta-write``: python-slimta 5.0.5's DiskStorage (which never fsyncs) under C producer
  greenlets (``bench/slimta_disk_bench.py``, run by the slimta virtualenv).
* ``smtpq-cycle`` / ``slimta-cycle``: enqueue -> instant relay (250) -> remove, through each
  project's Queue, timed until every message was removed.

Messages are never deleted between the write measurements: on ext4 without a journal, file
creation slows down for minutes after many deletions, so the deleting (cycle) measurements run
after all the others, and the scratch directory is removed at the very end. Peers alternate
within each round, so that drift on the shared machine hits them alike. Medians are printed
with ratios; ``--json FILE`` keeps every run.

The slimta virtualenv is made on first use (``--slimta-python``, default bench/work/slimta-venv)::

    python3 -m venv bench/work/slimta-venv
    bench/work/slimta-venv/bin/pip install python-slimta==5.0.5 'setuptools>=80,<82' pyaio==0.4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SLIMTA_PACKAGES = ["python-slimta==5.0.5", "setuptools>=80,<82", "pyaio==0.4"]
ENVELOPE_OVERHEAD = 260  # what Envelope.to_bytes adds to the message bytes (frame + JSON)


def envelope_bytes(i: int, size: int) -> tuple[bytes, bytes]:
    """The header block and body of message ``i`` (the same bytes as in slimta_disk_bench.py)."""
    header = (
        b"From: sender@example.com\r\nTo: rcpt@example.net\r\n"
        b"Subject: bench message %d\r\nMessage-Id: <%d.bench@example.com>\r\n\r\n" % (i, i)
    )
    line = b"x" * 76 + b"\r\n"
    return header, line * max(1, (size - len(header)) // len(line))


# -- children: one measurement each ----------------------------------------------------------


def run_raw(root: Path, n: int, size: int, batch: int, syncfs: bool) -> tuple[float, float]:
    """The plain durable loop; returns seconds and CPU seconds."""
    flush_fs = None
    if syncfs:
        from smtpq.storage.disk.libc import syncfs_function

        flush_fs = syncfs_function()
        assert flush_fs is not None, "no usable syncfs here"
    header, body = envelope_bytes(0, size)
    env_data = b"e" * (len(header) + len(body) + ENVELOPE_OVERHEAD)
    meta_data = b"m" * 100
    dirs = {name: root / name for name in ("tmp", "env", "meta")}
    for path in dirs.values():
        path.mkdir()
    env_fd = os.open(dirs["env"], os.O_RDONLY | os.O_DIRECTORY)
    meta_fd = os.open(dirs["meta"], os.O_RDONLY | os.O_DIRECTORY)
    cpu, started = time.process_time(), time.perf_counter()
    for first in range(0, n, batch):
        names = [f"{i:08d}" for i in range(first, min(n, first + batch))]
        for name in names:
            for suffix, data in ((".env", env_data), (".meta", meta_data)):
                fd = os.open(dirs["tmp"] / (name + suffix), os.O_WRONLY | os.O_CREAT, 0o600)
                os.write(fd, data)
                if flush_fs is None:
                    os.fsync(fd)
                os.close(fd)
        if flush_fs is not None:
            flush_fs(env_fd)
        for name in names:
            os.rename(dirs["tmp"] / f"{name}.env", dirs["env"] / f"{name}.env")
        os.fsync(env_fd)
        for name in names:
            os.rename(dirs["tmp"] / f"{name}.meta", dirs["meta"] / f"{name}.meta")
        os.fsync(meta_fd)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    os.close(env_fd)
    os.close(meta_fd)
    return elapsed, cpu


async def run_smtpq(
    root: Path, mode: str, n: int, size: int, conc: int, sync: str
) -> tuple[float, float]:
    """DiskStorage writes, or the Queue's enqueue -> relay -> remove cycle.

    Returns seconds and CPU seconds (worker threads included) of the timed part.
    """
    from smtpq.clock import SystemClock
    from smtpq.envelope import Envelope
    from smtpq.queue import Queue, QueueEvent
    from smtpq.relay.base import Relay, RelayResult
    from smtpq.storage.disk import DiskStorage, SyncMode

    class InstantRelay(Relay):
        async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
            return None

    envelopes = []
    for i in range(n):
        env = Envelope(f"sender{i}@example.com", ["rcpt@example.net"])
        header, body = envelope_bytes(i, size)
        env.parse(header + body)
        envelopes.append(env)
    store = DiskStorage(root / "env", root / "meta", sync=SyncMode(sync))
    await store.load()
    removed = 0
    done = asyncio.Event()

    def observe(event: QueueEvent) -> None:
        nonlocal removed
        if event.kind == "removed":
            removed += 1
            if removed == n:
                done.set()

    queue = Queue(store, InstantRelay(), clock=SystemClock(), hostname="bench.example")
    queue.observers.append(observe)
    work: Iterator[Envelope] = iter(envelopes)

    async def writer() -> None:
        for env in work:
            if mode == "write":
                await store.write(env, time.time())
            else:
                [(_, result)] = await queue.enqueue(env)
                assert isinstance(result, str), result

    if mode == "write":  # the storage alone: no queue claims and delivers what is written
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(conc)))
    else:
        await queue.start()
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(conc)))
        await asyncio.wait_for(done.wait(), 600)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await queue.stop()
    await store.close()
    return elapsed, cpu


def child(args: argparse.Namespace) -> None:
    """Measure once and print a JSON line (CPU: the timed part only, all threads)."""
    root = Path(args.dir)
    if args.child == "raw":
        elapsed, cpu = run_raw(root, args.n, args.size, args.batch, args.sync == "syncfs")
    else:
        conc = int(args.concurrency)
        coro = run_smtpq(root, args.child, args.n, args.size, conc, args.sync)
        elapsed, cpu = asyncio.run(coro)
    print(json.dumps({"msgs_per_s": args.n / elapsed, "cpu_us_per_msg": cpu / args.n * 1e6}))


# -- parent: rounds, medians, ratios -----------------------------------------------------------


class Bench:
    """Runs the measurements and keeps their results."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.count = 0

    def fresh_dir(self) -> Path:
        self.count += 1
        path = self.work / f"m{self.count:03d}"
        path.mkdir()
        return path

    def measure(self, label: str, cmd: list[str]) -> None:
        cmd = [*cmd, "-n", str(self.args.n), "--size", str(self.args.size)]
        cmd += ["--dir", str(self.fresh_dir())]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"  {label}: FAILED (exit {done.returncode})\n{done.stderr[-2000:]}")
            return
        result = json.loads(lines[-1])
        self.results.setdefault(label, []).append(result)
        rate, cpu = result["msgs_per_s"], result["cpu_us_per_msg"]
        print(f"  {label:28s} {rate:9.0f} msgs/s  {cpu:6.0f} us CPU/msg", flush=True)

    def ours(self, mode: str, conc: int, sync: str = "auto") -> None:
        cmd = [sys.executable, __file__, "--child", mode, "--concurrency", str(conc)]
        suffix = "" if sync == "auto" else f" {sync}"
        self.measure(f"smtpq-{mode} c={conc}{suffix}", [*cmd, "--sync", sync])

    def probe(self) -> None:
        """Print how fast this filesystem creates files now (recent deletions slow it)."""
        path = self.fresh_dir()
        started = time.perf_counter()
        for i in range(300):
            os.close(os.open(path / str(i), os.O_WRONLY | os.O_CREAT, 0o600))
        rate = 300 / (time.perf_counter() - started)
        print(f"  create probe: {rate:.0f} files/s  (load {os.getloadavg()[0]:.1f})", flush=True)

    def raw(self, batch: int, sync: str = "fsync") -> None:
        cmd = [sys.executable, __file__, "--child", "raw", "--batch", str(batch), "--sync", sync]
        suffix = "" if sync == "fsync" else f" {sync}"
        self.measure(f"raw batch={batch}{suffix}", cmd)

    def slimta(self, mode: str, conc: int) -> None:
        if self.args.slimta_python is None:
            return
        script = str(HERE / "slimta_disk_bench.py")
        cmd = [self.args.slimta_python, "-W", "ignore", script, "--mode", mode]
        self.measure(f"slimta-{mode} c={conc}", [*cmd, "--concurrency", str(conc)])

    def median(self, label: str) -> float | None:
        runs = self.results.get(label)
        return statistics.median(r["msgs_per_s"] for r in runs) if runs else None


def ensure_slimta(python: str) -> str | None:
    """The slimta virtualenv's interpreter, made on first use; None if that fails."""
    venv = Path(python).parent.parent
    if not Path(python).exists():
        print(f"making {venv} for python-slimta (once)", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "pip"), "install", "-q", *SLIMTA_PACKAGES]
            subprocess.run(pip, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"cannot make the slimta virtualenv ({exc}): slimta is left out")
            return None
    return python


def report(bench: Bench, concurrency: list[int]) -> list[str]:
    """The summary table: medians and the ratios the targets are stated in."""

    def fmt(value: float | None) -> str:
        return f"{value:7.0f}" if value is not None else "      -"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:5.2f}x" if a and b else "    -"

    lines = [
        "",
        "medians, msgs/s (2 KB messages); ratios are smtpq / peer",
        "smtpq: default sync (auto); fsync: sync='fsync'; raw: the plain loop, batch = writers,",
        "each file fsynced (raw) or one syncfs per batch (raw-fs); slimta never fsyncs",
        f"{'writers':>7} {'smtpq':>7} {'fsync':>7} {'raw':>7} {'raw-fs':>7} {'slimta':>7}"
        f" {'/raw':>6} {'/raw-fs':>7} {'/slimta':>7} {'fsync/raw':>9} {'fsync/slimta':>12}",
    ]
    for c in concurrency:
        ours = bench.median(f"smtpq-write c={c}")
        fsync = bench.median(f"smtpq-write c={c} fsync")
        raw = bench.median(f"raw batch={c}")
        raw_fs = bench.median(f"raw batch={c} syncfs")
        slimta = bench.median(f"slimta-write c={c}")
        lines.append(
            f"{c:7d} {fmt(ours)} {fmt(fsync)} {fmt(raw)} {fmt(raw_fs)} {fmt(slimta)}"
            f" {ratio(ours, raw):>6} {ratio(ours, raw_fs):>7} {ratio(ours, slimta):>7}"
            f" {ratio(fsync, raw):>9} {ratio(fsync, slimta):>12}"
        )
    lines += ["", f"{'cycle':>7} {'smtpq':>7} {'slimta':>7} {'/slimta':>7}"]
    for c in concurrency:
        ours = bench.median(f"smtpq-cycle c={c}")
        slimta = bench.median(f"slimta-cycle c={c}")
        lines.append(f"{c:7d} {fmt(ours)} {fmt(slimta)} {ratio(ours, slimta):>7}")
    return lines


def parent(args: argparse.Namespace) -> None:
    """All rounds, write measurements first, deleting ones last; then the summary."""
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.slimta_python is not None:
        args.slimta_python = ensure_slimta(args.slimta_python)
    # SIGTERM unwinds like Ctrl-C: the running child is killed, the scratch directory removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    base = Path(args.base).resolve()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="disk-bench-", dir=base))
    bench = Bench(args, work)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.node()}  kernel {platform.release()}"
        f"  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}  work dir {work}",
        flush=True,
    )
    try:
        measure_all(bench, args.runs, concurrency)
        print("\n".join(report(bench, concurrency)), flush=True)
        if args.json:
            meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv}
            Path(args.json).write_text(json.dumps({"meta": meta, "runs": bench.results}, indent=1))
    finally:
        print(f"removing {work}", flush=True)
        shutil.rmtree(work, ignore_errors=True)


def measure_all(bench: Bench, runs: int, concurrency: list[int]) -> None:
    """The rounds: every write measurement first, the deleting ones last."""
    for run in range(runs):
        print(f"round {run + 1}/{runs}: writes", flush=True)
        bench.probe()
        for c in concurrency:
            bench.raw(c)
            bench.ours("write", c)
            bench.slimta("write", c)
            bench.ours("write", c, "fsync")
            bench.raw(c, "syncfs")
    for run in range(runs):
        print(f"round {run + 1}/{runs}: enqueue -> relay -> remove", flush=True)
        bench.probe()
        for c in concurrency:
            bench.ours("cycle", c)
            bench.slimta("cycle", c)


def main() -> None:
    """Parse the options; run as the parent, or as one measuring child."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are taken)")
    parser.add_argument("-n", type=int, default=2000, help="messages per measurement")
    parser.add_argument("--size", type=int, default=2048, help="message bytes (about)")
    parser.add_argument("--concurrency", default="1,10,100", help="writers, comma-separated")
    parser.add_argument("--base", default=str(HERE / "work"), help="where the queues go")
    parser.add_argument("--slimta-python", default=str(HERE / "work/slimta-venv/bin/python"))
    parser.add_argument("--no-slimta", action="store_const", const=None, dest="slimta_python")
    parser.add_argument("--json", help="write every run to this file")
    parser.add_argument("--child", choices=["raw", "write", "cycle"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
