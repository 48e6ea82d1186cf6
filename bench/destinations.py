#!/usr/bin/env python3
"""A black hole beside a healthy destination: does the healthy mail still flow? (issue 15)

    smtp-source --> smtpq serve --[routes]--> ok.bench   -> smtp-sink (127.0.0.1:SINK_PORT)
                                          \\-> hole.bench -> a black hole (accepts, never answers)

Each sitting alternates two kinds of run, each on a fresh ``smtpq serve`` (disk storage, MX
relay with ``[routes]``), a fresh smtp-sink and a fresh black hole:

* ``healthy``: N x (1 - share) messages to ok.bench only;
* ``mixed``: N x share messages to hole.bench, then (``--order hole-first``, the case of the
  issue: the black hole's mail is queued first) or at the same time (``--order mixed``) the
  same N x (1 - share) messages to ok.bench.

Per run: the healthy messages' delivered msgs/s (their count over the time from the start of
their smtp-source until smtp-sink has them all) and the connections the black hole accepted
by then and by the end of the run. The black hole's ``connect_timeout`` (30 s, the default) is
longer than the healthy traffic takes, so the figure shows whether the black hole holds relay
slots that the healthy destination needs. The summary gives medians and the ratio mixed /
healthy (the target: at least 0.9; before scheduling per destination, about 0.02).

Usage (as root, as bench/e2e.py: smtp-sink drops to nobody)::

    .venv/bin/python bench/destinations.py                      # N = 1000, 10 % to the hole
    .venv/bin/python bench/destinations.py -n 5000 --runs 3 --json-out /tmp/dest.json
    .venv/bin/python bench/destinations.py -n 200 --runs 1      # a smoke run

Only 127.0.0.1 is used; every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e import (  # the bench's own helpers, beside this script
    HOST,
    REPO,
    SMTP_SINK,
    SMTP_SOURCE,
    BenchError,
    Sink,
    alive,
    log,
    stop_pid,
    tree_pids,
    wait_smtp_banner,
)

SENDER = "from@origin.bench"


class BlackHole:
    """A TCP listener that accepts every connection and never says a word; counts accepts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._held: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen, and accept in a thread."""
        self._sock.bind((HOST, self.port))
        self._sock.listen(1024)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            self._held.append(conn)

    def stop(self) -> None:
        """Close the listener and every connection it holds."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close does not)
        self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        for conn in self._held:
            conn.close()


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def smtpq_config(port: int, sink: int, hole: int, queue: Path, args: argparse.Namespace) -> str:
    """The TOML of ``smtpq serve`` under test: routes to the sink and to the black hole."""
    return f"""\
hostname = "smtpq.bench.localdomain"
grace_period = 1.0
workers = {args.workers}

[edge]
listen = ["{HOST}:{port}"]
reverse_lookup = false

[storage]
type = "disk"
path = "{queue}"
sync = "{args.sync}"

[relay]
type = "mx"

[smtp]
connect_timeout = {args.connect_timeout}

[routes]
"ok.bench" = "[{HOST}]:{sink}"
"hole.bench" = "[{HOST}]:{hole}"
"origin.bench" = "[{HOST}]:{sink}"
"""


@dataclass
class RunResult:
    """One run's figures."""

    kind: str
    run: int
    healthy: int
    hole_messages: int
    delivered_s: float | None
    delivered_rate: float | None
    hole_connections_during: int
    hole_connections_end: int
    failure: str | None


def send(
    port: int, count: int, rcpt: str, sessions: int, size: int, out: Path
) -> subprocess.Popen[bytes]:
    """smtp-source sending ``count`` messages to ``rcpt``."""
    cmd = [
        SMTP_SOURCE, "-s", str(sessions), "-l", str(size), "-m", str(count),
        "-f", SENDER, "-t", rcpt, f"{HOST}:{port}",
    ]  # fmt: skip
    with open(out, "wb") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def one_run(kind: str, index: int, args: argparse.Namespace, workdir: Path) -> RunResult:
    """Fresh sink, black hole and smtpq; the healthy mail's delivery rate."""
    rundir = workdir / f"{kind}-{index}"
    rundir.mkdir()
    healthy = round(args.n * (1 - args.share))
    holes = args.n - healthy if kind == "mixed" else 0
    mta_port, sink_port, hole_port = free_port(), free_port(), free_port()
    sink = Sink(sink_port, rundir)
    sink.start(healthy)
    hole = BlackHole(hole_port)
    hole.start()
    queue = rundir / "queue"
    config = rundir / "smtpq.toml"
    config.write_text(smtpq_config(mta_port, sink_port, hole_port, queue, args))
    smtpq = [*args.smtpq_cmd, "serve", "-c", str(config)]
    with open(rundir / "smtpq.log", "wb") as out:
        proc = subprocess.Popen(smtpq, stdout=out, stderr=subprocess.STDOUT, cwd=rundir)
    failures: list[str] = []
    try:
        wait_smtp_banner(mta_port, 60, proc)
        sources = []
        if holes:
            sources.append(send(mta_port, holes, "x@hole.bench", 1, args.size, rundir / "h.out"))
            if args.order == "hole-first":
                sources[-1].wait(120)
        t0 = time.monotonic()
        ok = send(mta_port, healthy, "y@ok.bench", args.sessions, args.size, rundir / "ok.out")
        sources.append(ok)
        reached = sink.wait(t0 + args.timeout)
        during = hole.accepted
        for source in sources:
            if source.wait(120) != 0:
                failures.append(f"smtp-source exit {source.returncode}")
        if reached is None:
            failures.append(f"sink had {sink.count}/{healthy} after {args.timeout:.0f} s")
        time.sleep(args.linger)  # the black hole's timeouts fire; probes stay out
        took = reached - t0 if reached is not None else None
        return RunResult(
            kind=kind,
            run=index,
            healthy=healthy,
            hole_messages=holes,
            delivered_s=round(took, 3) if took else None,
            delivered_rate=round(healthy / took, 1) if took else None,
            hole_connections_during=during,
            hole_connections_end=hole.accepted,
            failure="; ".join(failures) or None,
        )
    finally:
        descendants = tree_pids(proc.pid)[1:]
        stop_pid(proc.pid)
        proc.wait()
        for pid in descendants:
            if alive(pid):
                stop_pid(pid, 5)
        hole.stop()
        sink.stop()


def summarize(results: Sequence[RunResult]) -> dict[str, object]:
    """Medians per kind, and the ratio mixed / healthy."""

    def median(kind: str, key: str) -> float | None:
        values = [getattr(r, key) for r in results if r.kind == kind and r.failure is None]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    healthy, mixed = median("healthy", "delivered_rate"), median("mixed", "delivered_rate")
    return {
        "healthy_rate": healthy,
        "mixed_rate": mixed,
        "ratio": round(mixed / healthy, 3) if healthy and mixed else None,
        "hole_connections_during": median("mixed", "hole_connections_during"),
        "hole_connections_end": median("mixed", "hole_connections_end"),
    }


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """A scratch directory (bench/work/ by default), removed at the end."""
    base = path or REPO / "bench" / "work"
    base.mkdir(parents=True, exist_ok=True)
    made = Path(tempfile.mkdtemp(prefix="destinations-", dir=base))
    made.chmod(0o755)  # smtp-sink runs as nobody
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=1000, help="messages per mixed run (1000)")
    p.add_argument("--share", type=float, default=0.1, help="share to the black hole (0.1)")
    p.add_argument("--order", choices=["hole-first", "mixed"], default="hole-first")
    p.add_argument("--runs", type=int, default=3, help="runs of each kind, interleaved (3)")
    p.add_argument("--sessions", type=int, default=10, help="smtp-source sessions (10)")
    p.add_argument("--size", type=int, default=2048, help="bytes per message (2048)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="smtpq's (30 s)")
    p.add_argument("--sync", default="auto", help="storage.sync of smtpq (auto)")
    p.add_argument("--workers", type=int, default=1, help="smtpq worker processes (1)")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait for the sink")
    p.add_argument("--linger", type=float, default=2.0, help="seconds after, before stopping")
    p.add_argument("--smtpq-cmd", nargs="+", default=[sys.executable, "-m", "smtpq.daemon.cli"])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0 < args.share < 1:
        p.error("--share must be between 0 and 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sitting and print the results."""
    args = parse_args(argv)
    for tool in (SMTP_SINK, SMTP_SOURCE):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} not found (Postfix's test tools: apt-get install postfix)")
    results: list[RunResult] = []
    with workdir(args.workdir) as scratch:
        for index in range(1, args.runs + 1):
            for kind in ("healthy", "mixed"):
                try:
                    result = one_run(kind, index, args, scratch)
                except BenchError as exc:
                    log(f"{kind} run {index} failed: {exc}")
                    continue
                results.append(result)
                log(json.dumps(asdict(result)))
    summary = summarize(results)
    log("summary: " + json.dumps(summary))
    if args.json_out is not None:
        args.json_out.write_text(
            json.dumps({"args": vars(args) | {"workdir": None, "json_out": None},
                        "runs": [asdict(r) for r in results], "summary": summary}, indent=2)
        )  # fmt: skip
    return 0 if summary["ratio"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
