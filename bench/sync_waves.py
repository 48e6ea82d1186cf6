"""Sync calls and sync waves per message at one session: DiskStorage's flushes as the kernel
sees them (issue 12: Postfix makes one per message).

One command (from the repository root, after ``make`` has made ``.venv``; needs strace, and for
``serve`` Postfix's smtp-source and smtp-sink)::

    .venv/bin/python bench/sync_waves.py                    # both: write and serve, -n 200
    .venv/bin/python bench/sync_waves.py write --sync fsync -n 100

* ``write``: a child process makes N ``DiskStorage.write`` calls one after the other.
* ``serve``: ``smtpq serve`` (one worker, ``--smarthost`` to an ``smtp-sink`` on loopback)
  receives N messages of 2 KB from ``smtp-source -s 1``, a new connection each, and delivers
  and removes each one; counted until its queue is empty.

Both run under ``strace -f --seccomp-bpf -ttt -T -e trace=fsync,fdatasync,syncfs``; only the
calls between the first message and the end of the last one count (not start-up, not shutdown).
A *wave* is a group of calls that overlap in time (made in parallel threads): the device
flushes them together, so waves per message is the latency a message waits for. strace counts
calls; the times it notes only tell which calls overlapped: this is no timing benchmark.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
TRACE = ["strace", "-f", "--seccomp-bpf", "-ttt", "-T", "-e", "trace=fsync,fdatasync,syncfs"]
_CALL = re.compile(
    r"(?P<pid>\d+)\s+(?P<t>\d+\.\d+)\s+(?:"
    r"(?P<done>\w+)\(.*\)\s+= .*<(?P<took>[\d.]+)>"
    r"|(?P<begun>\w+)\(.*<unfinished \.\.\.>"
    r"|<\.\.\. (?P<resumed>\w+) resumed>.*<(?P<rest>[\d.]+)>)$"
)

WRITER = """
import asyncio, sys, time
from smtpq.envelope import Envelope
from smtpq.storage.disk import DiskStorage

async def main(root, n, sync):
    store = DiskStorage(root + "/env", root + "/meta", sync=sync)
    await store.load()
    print(time.time(), flush=True)
    for i in range(n):
        env = Envelope("a@example.org", ["b@example.com"])
        env.parse(b"Subject: %d\\r\\n\\r\\n" % i + b"x" * 2048)
        await store.write(env, 1.0)
    print(time.time(), flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def syncs(trace: Path, start: float, end: float) -> tuple[Counter[str], int]:
    """The sync calls begun in [start, end] by name, and the waves they made."""
    calls: Counter[str] = Counter()
    spans: list[tuple[float, float]] = []
    begun: dict[tuple[str, str], float] = {}
    for line in trace.read_text().splitlines():
        m = _CALL.match(line)
        if m is None:
            continue
        t = float(m["t"])
        if m["begun"]:
            begun[m["pid"], m["begun"]] = t
            continue
        name = m["done"] or m["resumed"]
        first = t if m["done"] else begun.pop((m["pid"], name), t)
        if start <= first <= end:
            calls[name] += 1
            spans.append((first, first + float(m["took"] or m["rest"])))
    waves, reach = 0, -1.0
    for first, last in sorted(spans):
        if first > reach:
            waves += 1
        reach = max(reach, last)
    return calls, waves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_write(work: Path, n: int, sync: str) -> tuple[Counter[str], int]:
    trace = work / "write.trace"
    cmd = [*TRACE, "-o", str(trace), sys.executable, "-c", WRITER, str(work / "q"), str(n), sync]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return syncs(trace, float(out[0]), float(out[1]))


def run_serve(work: Path, n: int, sync: str) -> tuple[Counter[str], int]:
    trace, queue = work / "serve.trace", work / "queue"
    sink_port, port = free_port(), free_port()
    config = work / "smtpq.toml"
    config.write_text(f'[storage]\nsync = "{sync}"\n')
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{sink_port}", "100"])
    smtpq = Path(sys.executable).parent / "smtpq"
    options = {
        "-c": str(config),
        "--listen": f"127.0.0.1:{port}",
        "--queue-dir": str(queue),
        "--workers": "1",
        "--smarthost": f"127.0.0.1:{sink_port}",
        "--log-level": "warning",
    }
    args = [arg for option in options.items() for arg in option]
    serve = subprocess.Popen([*TRACE, "-o", str(trace), str(smtpq), "serve", *args])
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            if time.monotonic() > deadline:
                raise SystemExit("smtpq serve did not listen")
            time.sleep(0.1)
        start = time.time()
        subprocess.run([SMTP_SOURCE, "-s", "1", "-m", str(n), "-l", "2048", f"127.0.0.1:{port}"])
        while any(queue.rglob("*.meta")):
            if time.monotonic() > deadline + 600:
                raise SystemExit("the queue did not drain")
            time.sleep(0.05)
        end = time.time()
    finally:
        children = Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split()
        for pid in children:  # smtpq itself, traced by strace (whose pid is serve.pid)
            os.kill(int(pid), signal.SIGTERM)
        serve.wait(60)
        sink.terminate()
        sink.wait(10)
    return syncs(trace, start, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="both", choices=["write", "serve", "both"])
    parser.add_argument("-n", type=int, default=200, help="messages (default 200)")
    parser.add_argument("--sync", default="auto", help="DiskStorage sync mode (default auto)")
    opts = parser.parse_args()
    print("| run | sync | messages | calls | calls/msg | waves/msg |\n|---|---|---:|---|---:|---:|")
    for what in ["write", "serve"] if opts.what == "both" else [opts.what]:
        work = Path(tempfile.mkdtemp(prefix="sync-waves-"))
        try:
            run = run_write if what == "write" else run_serve
            calls, waves = run(work, opts.n, opts.sync)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        named = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        total = sum(calls.values())
        print(
            f"| {what} | {opts.sync} | {opts.n} | {named} | {total / opts.n:.2f} |"
            f" {waves / opts.n:.2f} |"
        )


if __name__ == "__main__":
    main()
