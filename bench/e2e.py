#!/usr/bin/env python3
"""End-to-end throughput of smtpq and its peers, on loopback only.

    smtp-source --> MTA under test (127.0.0.1:MTA_PORT) --> smtp-sink (127.0.0.1:SINK_PORT)

MTAs (``--mta``):

* ``smtpq``: ``smtpq serve`` with durable disk storage (the default sync: syncfs or fsync per
  commit), relay type smarthost to the sink; config from :func:`smtpq_config`; one worker
  process (``--smtpq-workers``).
* ``smtpq-w2``: the same with two worker processes (``workers = 2``: SO_REUSEPORT listeners,
  one disk shard each), both cores of the benchmark machine; ``smtpq-wN`` for N workers.
* ``smtpq-journal``, ``smtpq-journal-wN``: the same on journal storage (``type = "journal"``:
  an append-only journal per shard, one fdatasync per batch of writes).
* ``postfix``: Postfix from the distribution with stock performance settings, listening on the
  MTA port and relaying everything to the sink (``relayhost``); queue on disk, fsync.
* ``slimta``: python-slimta 5.0.5 (SmtpEdge + Queue + DiskStorage + StaticSmtpRelay) in its own
  virtualenv, run by ``bench/slimta_mta.py``. Its DiskStorage never fsyncs.
* ``direct``: no MTA, smtp-source straight into smtp-sink: the ceiling of the tools.

Every run starts a fresh sink and a fresh MTA on an empty queue, sends N messages of --size
bytes with Postfix's smtp-source at the given number of sessions (a new connection per
message, smtp-source's default), and waits until smtp-sink has counted all N (its ``-c``
counters) or --timeout passes. Per run it records:

* accepted msgs/s = N / (time until smtp-source exits),
* delivered msgs/s = N / (time until the sink has N), both from smtp-source's start,
* the MTA's CPU seconds over that window, summed over its process tree (utime + stime +
  reaped children's, from /proc/<pid>/stat), its peak memory (the largest sum over its live
  processes of VmHWM, and of Pss, sampled every 0.2 s), and the CPU the rest of the machine
  used meanwhile (/proc/stat busy time minus MTA, smtp-source, smtp-sink and this harness):
  the machine is shared, so that says how noisy the run was; likewise the share of the run
  the disk was busy (/proc/diskstats), since the MTAs that fsync wait for the shared disk,
* failures: smtp-source errors, fewer than N delivered, more than N (duplicates).

Runs are interleaved (for each session count, run 1 of every MTA, then run 2, ...) so that a
change in the machine's load hits every MTA alike. The summary gives medians over the complete
runs and the ratios smtpq/postfix and smtpq/slimta (likewise for each smtpq-wN).

Usage (as root; apt, pip and Postfix need it)::

    python3 bench/e2e.py --setup                      # install and configure, then exit
    python3 bench/e2e.py --all                        # setup, then every MTA, 1/10/50, N=5000
    python3 bench/e2e.py --mta postfix,direct --sessions 50 -n 5000 --runs 3 --json-out r.json
    python3 bench/e2e.py --profile bench/work/prof.json --sessions 50   # one smtpq run under py-spy

Only 127.0.0.1 is used. Every process this harness starts is stopped by its pid (Postfix by
``postfix stop``, which signals its master's pid); a Postfix that was already running is left
alone and the postfix runs are skipped. ``--mta postfix`` deletes whatever is in the local
Postfix queue (``postsuper -d ALL``): bench machines only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SLIMTA_VENV = REPO / "bench" / "work" / "slimta-venv"
SLIMTA_PACKAGES = ("python-slimta==5.0.5", "setuptools>=80,<82", "pyaio==0.4")
MTAS = ("smtpq", "smtpq-w2", "postfix", "slimta", "direct")
# smtpq with N worker processes: "smtpq-wN"; on journal storage: "smtpq-journal[-wN]".
_SMTPQ_WORKERS = re.compile(r"smtpq(-journal)?(?:-w([1-9][0-9]*))?")
SENDER = "from@example.com"
RECIPIENT = "to@example.net"
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.2


class BenchError(Exception):
    """A run or the setup could not be carried out; the message says why."""


def log(text: str) -> None:
    """Progress goes to stderr so that stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], *, check: bool = True, quiet: bool = False) -> str:
    """Run a short command and return its stdout; a failure raises BenchError."""
    if not quiet:
        log("$ " + shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def wait_smtp_banner(port: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    """Wait until 127.0.0.1:port greets with 220 (an MTA is ready), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.pid} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"nothing greeted on {HOST}:{port} within {timeout:.0f} s")


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM one process we started, then SIGKILL it if it outlives the timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    if alive(pid):
        log(f"pid {pid} ignored SIGTERM for {timeout:.0f} s; SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# ---------------------------------------------------------------- process accounting (/proc)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return text.rpartition(")")[2].split()


def tree_pids(root: int) -> list[int]:
    """root and all its live descendants (from every process's parent pid in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds of pid plus those of its children it has reaped (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 after the name.
    return sum(int(x) for x in fields[11:15]) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: each live process's own and its reaped children's.

    A child that exited was accounted to the parent that waited for it, so summing the live
    processes counts every descendant once, as long as its parent reaps it (Postfix's master
    does).
    """
    return sum(process_cpu(pid) for pid in tree_pids(root))


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def system_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat, minus idle and iowait)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICK


def disk_busy_ms(path: Path) -> int | None:
    """Milliseconds the disk holding path has had I/O in flight (/proc/diskstats io_ticks).

    Over a run, divided by its duration, that says how busy the disk was, whoever used it:
    on a shared machine another program's fsyncs slow every MTA that fsyncs.
    """
    dev = path.stat().st_dev
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if (int(fields[0]), int(fields[1])) == (os.major(dev), os.minor(dev)):
            return int(fields[12])
    return None


def own_cpu() -> float:
    """This harness's CPU seconds so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class MemorySampler:
    """Tracks the peak of the summed VmHWM and Pss of a process tree in a background thread.

    VmHWM is each process's own high-water mark of resident memory; summed over processes it
    counts shared pages once per process, so Pss (shared pages divided among their users) is
    kept too: it is the fairer figure for a multi-process MTA like Postfix.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_hwm_kb = 0
        self.peak_pss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        """Take one sample now."""
        pids = tree_pids(self.root)
        self.peak_hwm_kb = max(self.peak_hwm_kb, sum(_status_kb(p, "VmHWM:") for p in pids))
        self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in pids))

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()


# ---------------------------------------------------------------- the sink


def sink_counter(data: bytes) -> tuple[int | None, bytes]:
    """The last ``mesg=`` count in smtp-sink's ``-c`` output, and the unfinished rest.

    Each counter line ends in ``\\r``; the bytes after the last one may be half a line.
    """
    *records, rest = data.split(b"\r")
    for record in reversed(records):
        match = re.search(rb"mesg=(\d+)", record)
        if match:
            return int(match.group(1)), rest
    return None, rest


class Sink:
    """smtp-sink on 127.0.0.1:port, with its running message counter read from its stdout.

    ``smtp-sink -c`` prints ``sess=.. quit=.. mesg=..\\r`` whenever a session ends or a message's
    final "." arrives; a reader thread notes the monotonic time at which mesg reaches the target.
    smtp-sink binds with SO_REUSEPORT, so a second sink on the port would silently take part of
    the connections: start() refuses a busy port.
    """

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.count = 0
        self.target = 0
        self.reached: float | None = None
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The sink's pid."""
        assert self._proc is not None
        return self._proc.pid

    def start(self, target: int) -> None:
        """Start the sink, expecting target messages."""
        if port_open(self.port):
            raise BenchError(f"{HOST}:{self.port} (sink port) is already in use")
        self.count, self.target, self.reached = 0, target, None
        with open(self.workdir / "sink.err", "wb") as err:
            self._proc = subprocess.Popen(
                [SMTP_SINK, "-u", "nobody", "-c", f"{HOST}:{self.port}", "1000"],
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.stop()
                raise BenchError(f"smtp-sink did not listen on {HOST}:{self.port}")
            time.sleep(0.02)

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            count, pending = sink_counter(pending + chunk)
            if count is not None:
                self._update(count)

    def _update(self, count: int) -> None:
        now = time.monotonic()
        with self._cond:
            self.count = count
            if count >= self.target and self.reached is None:
                self.reached = now
                self._cond.notify_all()

    def wait(self, deadline: float) -> float | None:
        """The time the sink had all target messages, or None if the deadline passed first."""
        with self._cond:
            self._cond.wait_for(lambda: self.reached is not None, deadline - time.monotonic())
            return self.reached

    def stop(self) -> None:
        """Stop the sink by its pid."""
        if self._proc is not None:
            stop_pid(self._proc.pid, 5)
            self._proc.wait()
            if self._reader is not None:
                self._reader.join(5)
            assert self._proc.stdout is not None
            self._proc.stdout.close()
            self._proc = None


# ---------------------------------------------------------------- the MTAs under test


@dataclass
class Settings:
    """Everything a run depends on (from the command line)."""

    n: int = 5000
    size: int = 2048
    runs: int = 3
    sessions: tuple[int, ...] = (1, 10, 50)
    mtas: tuple[str, ...] = MTAS
    mta_port: int = 2535
    sink_port: int = 2536
    timeout: float = 600.0
    smtpq_venv: Path = REPO / ".venv"
    smtpq_cmd: tuple[str, ...] = ()
    smtpq_workers: int = 1
    smtpq_sync: str | None = None  # None: the product's default
    slimta_relay_pool: int = 20
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def smtpq_command(self) -> list[str]:
        """The smtpq executable (``--smtpq-cmd`` or the venv's console script)."""
        return list(self.smtpq_cmd) or [str(self.smtpq_venv / "bin" / "smtpq")]


class Mta(Protocol):
    """One MTA under test: started fresh, on an empty queue, for each run."""

    name: str

    def start(self, rundir: Path) -> int | None:
        """Start on an empty queue and return the root pid of its processes (None: no MTA)."""

    def stop(self) -> None:
        """Stop every process start() started, by pid."""

    def leftover(self) -> int:
        """Messages (queue files) still in its queue after the run."""


def smtpq_config(
    *,
    listen_port: int,
    sink_port: int,
    queue_dir: Path,
    workers: int = 1,
    sync: str | None = None,
    storage: str = "disk",
) -> str:
    """The TOML configuration of ``smtpq serve`` under test (format: smtpq.daemon.config).

    Durable disk storage (the default ``sync = "auto"``: syncfs or fsync) and the product's
    defaults otherwise (opportunistic TLS: smtp-sink offers none); only what is needed to listen
    on the bench port and relay everything to the sink is set, and the client's reverse DNS
    lookup is off, as Postfix runs here with ``smtpd_peername_lookup = no``.
    """
    return f"""\
hostname = "smtpq.bench.localdomain"
workers = {workers}
grace_period = 5.0

[edge]
listen = ["{HOST}:{listen_port}"]
reverse_lookup = false

[storage]
type = "{storage}"
path = "{queue_dir}"
{f'sync = "{sync}"' if sync else ""}

[relay]
type = "smarthost"
host = "{HOST}"
port = {sink_port}
"""


class ChildMta:
    """An MTA that is one child process of ours (smtpq, slimta); its queue lives in the run dir."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        match = _SMTPQ_WORKERS.fullmatch(name)
        self.workers = int(match.group(2)) if match and match.group(2) else settings.smtpq_workers
        self.storage = "journal" if match and match.group(1) else "disk"
        self._proc: subprocess.Popen[bytes] | None = None
        self._queue_dir: Path | None = None

    def command(self, rundir: Path, queue_dir: Path) -> list[str]:
        """The command line that starts the MTA."""
        s = self.settings
        if is_smtpq(self.name):
            config = rundir / "smtpq.toml"
            config.write_text(
                smtpq_config(
                    listen_port=s.mta_port,
                    sink_port=s.sink_port,
                    queue_dir=queue_dir,
                    workers=self.workers,
                    sync=s.smtpq_sync,
                    storage=self.storage,
                )
            )
            return [*s.smtpq_command(), "serve", "-c", str(config)]
        return [
            str(SLIMTA_VENV / "bin" / "python"),
            "-W",
            "ignore",
            str(REPO / "bench" / "slimta_mta.py"),
            f"--listen={HOST}:{s.mta_port}",
            f"--relay={HOST}:{s.sink_port}",
            f"--queue-dir={queue_dir}",
            f"--relay-pool={s.slimta_relay_pool}",
        ]

    def start(self, rundir: Path) -> int | None:
        """Start the process on a new, empty queue directory and wait for its greeting."""
        if port_open(self.settings.mta_port):
            raise BenchError(f"{HOST}:{self.settings.mta_port} (MTA port) is already in use")
        self._queue_dir = rundir / "queue"
        self._queue_dir.mkdir()
        cmd = self.command(rundir, self._queue_dir)
        with open(rundir / f"{self.name}.log", "wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=rundir)
        try:
            wait_smtp_banner(self.settings.mta_port, 60, self._proc)
        except BenchError:
            self.stop()
            raise
        return self._proc.pid

    def stop(self) -> None:
        """SIGTERM the process (its own children with it), then any descendant left, by pid."""
        if self._proc is None:
            return
        descendants = tree_pids(self._proc.pid)[1:]
        stop_pid(self._proc.pid)
        self._proc.wait()
        for pid in descendants:
            if alive(pid):
                stop_pid(pid, 5)
        self._proc = None

    def leftover(self) -> int:
        """Queue files left (envelope files for both MTAs: ``*.env``; a journal has none, and
        the sink's count tells whether everything was delivered)."""
        if self._queue_dir is None:
            return 0
        return sum(1 for _ in self._queue_dir.rglob("*.env"))


class PostfixMta:
    """The system's Postfix, configured by configure_postfix(); started per run."""

    name = "postfix"
    queue_subdirs = ("incoming", "active", "deferred", "maildrop", "hold")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._master: int | None = None
        self.spool = Path(run(["postconf", "-h", "queue_directory"], quiet=True).strip())

    def start(self, rundir: Path) -> int | None:
        """postsuper -d ALL, postfix start, and wait for smtpd's greeting."""
        if postfix_running():
            raise BenchError("a Postfix is already running; not touching it")
        if port_open(self.settings.mta_port):
            raise BenchError(f"{HOST}:{self.settings.mta_port} (MTA port) is already in use")
        run(["postsuper", "-d", "ALL"], check=False, quiet=True)
        run(["postfix", "start"], quiet=True)
        pidfile = self.spool / "pid" / "master.pid"
        self._master = int(pidfile.read_text().split()[0])
        try:
            wait_smtp_banner(self.settings.mta_port, 60, None)
        except BenchError:
            self.stop()
            raise
        return self._master

    def stop(self) -> None:
        """``postfix stop`` (SIGTERM to the master's pid), then wait for its processes to go."""
        if self._master is None:
            return
        pids = tree_pids(self._master)
        run(["postfix", "stop"], check=False, quiet=True)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if alive(pid):
                stop_pid(pid, 5)
        self._master = None

    def leftover(self) -> int:
        """Files in the queues that hold messages (deleted before the next run)."""
        return sum(
            1 for d in self.queue_subdirs for p in (self.spool / d).rglob("*") if p.is_file()
        )


def postfix_running() -> bool:
    """Whether a Postfix master runs (``postfix status`` exits 0)."""
    return subprocess.run(["postfix", "status"], capture_output=True, check=False).returncode == 0


class DirectMta:
    """No MTA: smtp-source talks to smtp-sink itself (the tools' ceiling)."""

    name = "direct"

    def start(self, rundir: Path) -> int | None:
        """Nothing to start."""
        return None

    def stop(self) -> None:
        """Nothing to stop."""

    def leftover(self) -> int:
        """No queue."""
        return 0


# ---------------------------------------------------------------- setup


def configure_postfix(mta_port: int, sink_port: int) -> None:
    """Postfix listens on 127.0.0.1:mta_port only and relays everything to the sink.

    As ../shared/bench/postfix_bench.sh does: stock performance settings (in_flow_delay,
    concurrency and process limits untouched), no port-25 smtpd, no chroot (Debian's chroot
    needs files copied into the spool), a log file instead of syslog.
    """
    run(
        [
            "postconf",
            "-e",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mydestination =",
            "local_transport = error:local delivery disabled",
            "default_transport = smtp",
            "relay_transport = smtp",
            f"relayhost = [{HOST}]:{sink_port}",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks reject",
            "smtp_dns_support_level = disabled",
            "smtpd_peername_lookup = no",
            "maillog_file = /var/log/postfix-bench.log",
        ]
    )
    service = f"{HOST}:{mta_port}"
    for line in run(["postconf", "-M"], quiet=True).splitlines():
        name, kind = [*line.split(), "", ""][:2]
        if kind == "inet" and name != service and (name == "smtp" or name.startswith(HOST)):
            run(["postconf", "-MX", f"{name}/inet"])
    run(["postconf", "-M", f"{service}/inet={service} inet n - n - - smtpd"])
    run(["postconf", "-F", "*/*/chroot = n"])
    run(["postfix", "check"])


def setup(settings: Settings) -> None:
    """Install and configure what the selected MTAs need (idempotent)."""
    if not (Path(SMTP_SOURCE).exists() and shutil.which("postconf")):
        run(["apt-get", "update", "-q"])
        for line in (
            "postfix postfix/main_mailer_type select Local only",
            "postfix postfix/mailname string bench.localdomain",
        ):
            subprocess.run(["debconf-set-selections"], input=line, text=True, check=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        log("$ apt-get install -y -q postfix")
        subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], env=env, check=True)
    if "postfix" in settings.mtas:
        configure_postfix(settings.mta_port, settings.sink_port)
    if "slimta" in settings.mtas and not (SLIMTA_VENV / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(SLIMTA_VENV)])
        run([str(SLIMTA_VENV / "bin" / "pip"), "install", "-q", *SLIMTA_PACKAGES])
    if any(map(is_smtpq, settings.mtas)) and not settings.smtpq_cmd:
        venv = settings.smtpq_venv
        if not (venv / "bin" / "python").exists():
            run([sys.executable, "-m", "venv", str(venv)])
        # Editable: the venv always runs the checkout's current source.
        run([str(venv / "bin" / "pip"), "install", "-q", "-e", f"{REPO}[fast]"])


# ---------------------------------------------------------------- one run


@dataclass
class RunResult:
    """What one run measured."""

    mta: str
    sessions: int
    run: int
    n: int
    accepted_s: float
    delivered_s: float | None
    accepted_rate: float
    delivered_rate: float | None
    sink_count: int
    source_rc: int
    mta_cpu_s: float | None
    peak_hwm_mb: float | None
    peak_pss_mb: float | None
    source_cpu_s: float
    sink_cpu_s: float
    harness_cpu_s: float
    other_cpu_s: float
    disk_busy_pct: float | None
    loadavg_start: float
    leftover: int
    failure: str | None

    @property
    def ok(self) -> bool:
        """All N delivered exactly once, and smtp-source reported no error."""
        return self.failure is None


def one_run(mta: Mta, sessions: int, index: int, settings: Settings) -> RunResult:
    """Fresh sink, fresh MTA, N messages through; measure, stop everything, report."""
    rundir = settings.workdir / f"{mta.name}-s{sessions}-r{index}"
    rundir.mkdir(parents=True)
    sink = Sink(settings.sink_port, rundir)
    sink.start(settings.n)
    target = settings.sink_port if mta.name == "direct" else settings.mta_port
    try:
        root = mta.start(rundir)
        try:
            if root is None:
                return _measure(mta.name, sessions, index, settings, sink, None, target, rundir)
            with MemorySampler(root) as sampler:
                result = _measure(mta.name, sessions, index, settings, sink, root, target, rundir)
            result.peak_hwm_mb = round(sampler.peak_hwm_kb / 1024, 1)
            result.peak_pss_mb = round(sampler.peak_pss_kb / 1024, 1)
        finally:
            mta.stop()
        result.leftover = mta.leftover()
        return result
    finally:
        sink.stop()


def _measure(
    name: str,
    sessions: int,
    index: int,
    settings: Settings,
    sink: Sink,
    root: int | None,
    target: int,
    rundir: Path,
) -> RunResult:
    n = settings.n
    load = os.getloadavg()[0]
    cmd = [
        SMTP_SOURCE,
        *("-s", str(sessions), "-l", str(settings.size), "-m", str(n)),
        *("-f", SENDER, "-t", RECIPIENT, f"{HOST}:{target}"),
    ]
    mta_cpu0 = tree_cpu(root) if root else 0.0
    sink_cpu0, busy0, own0 = process_cpu(sink.pid), system_busy(), own_cpu()
    disk0 = disk_busy_ms(rundir)
    t0 = time.monotonic()
    with open(rundir / "source.out", "wb") as out:
        source = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(source.pid, 0)
    t1 = time.monotonic()
    source.returncode = os.waitstatus_to_exitcode(status)
    t2 = sink.wait(t0 + settings.timeout)
    mta_cpu = tree_cpu(root) - mta_cpu0 if root else None
    sink_cpu = process_cpu(sink.pid) - sink_cpu0
    busy, own = system_busy() - busy0, own_cpu() - own0
    disk1 = disk_busy_ms(rundir)
    window = (t2 or time.monotonic()) - t0
    # Duplicates show up after the N-th message: give them a moment before the final count.
    time.sleep(0.5)
    source_cpu = usage.ru_utime + usage.ru_stime
    failures = []
    if source.returncode != 0:
        tail = (rundir / "source.out").read_text(errors="replace").strip().splitlines()[-3:]
        failures.append(f"smtp-source exit {source.returncode}: {' | '.join(tail)}")
    if t2 is None:
        failures.append(f"sink had {sink.count}/{n} after {settings.timeout:.0f} s")
    elif sink.count > n:
        failures.append(f"sink got {sink.count} messages for {n} sent (duplicates)")
    result = RunResult(
        mta=name,
        sessions=sessions,
        run=index,
        n=n,
        accepted_s=round(t1 - t0, 3),
        delivered_s=round(t2 - t0, 3) if t2 else None,
        accepted_rate=round(n / (t1 - t0), 1),
        delivered_rate=round(n / (t2 - t0), 1) if t2 else None,
        sink_count=sink.count,
        source_rc=source.returncode,
        mta_cpu_s=round(mta_cpu, 2) if mta_cpu is not None else None,
        peak_hwm_mb=None,
        peak_pss_mb=None,
        source_cpu_s=round(source_cpu, 2),
        sink_cpu_s=round(sink_cpu, 2),
        harness_cpu_s=round(own, 2),
        other_cpu_s=round(busy - (mta_cpu or 0) - source_cpu - sink_cpu - own, 2),
        disk_busy_pct=(
            round((disk1 - disk0) / 10 / window, 1) if disk0 is not None and disk1 else None
        ),
        loadavg_start=load,
        leftover=0,
        failure="; ".join(failures) or None,
    )
    return result


# ---------------------------------------------------------------- profile


def profile(settings: Settings, py_spy: str, out: Path, sessions: int) -> None:
    """One smtpq run under ``py-spy record`` (speedscope format), then its top functions."""
    mta = ChildMta("smtpq", settings)
    rundir = settings.workdir / f"profile-s{sessions}"
    rundir.mkdir(parents=True)
    sink = Sink(settings.sink_port, rundir)
    sink.start(settings.n)
    spy: subprocess.Popen[bytes] | None = None
    try:
        root = mta.start(rundir)
        assert root is not None
        # --gil: only the thread holding the GIL is sampled, i.e. where CPU goes in Python.
        # Without it, uvloop's epoll wait (in C, unknown to py-spy's idle heuristics) and the
        # disk threads' fsync waits count as busy and drown the costs.
        spy_cmd = [py_spy, "record", "--pid", str(root), "--subprocesses", "--rate", "100"]
        spy_cmd += ["--gil", "--format", "speedscope", "--output", str(out)]
        with open(rundir / "py-spy.log", "wb") as spy_log:
            spy = subprocess.Popen(spy_cmd, stdout=spy_log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # py-spy attaches
        result = _measure(
            "smtpq+py-spy", sessions, 1, settings, sink, root, settings.mta_port, rundir
        )
        print(json.dumps(asdict(result)))
    finally:
        if spy is not None:
            # SIGINT makes py-spy write its output and exit.
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)
            spy.wait(60)
        mta.stop()
        sink.stop()
    print_profile(out)


def print_profile(path: Path, top: int = 30) -> None:
    """The hottest functions of a py-spy speedscope profile: event loop thread, then the rest.

    py-spy makes one frame per (function, line); they are merged per function here, which is
    the granularity a cost is fixed at. A sample's weight is the time it stands for. Recorded
    with ``--gil`` (as profile() does), the shares are of the time a thread held the GIL, i.e.
    ran Python or C code called from it; time in C code, uvloop's included, shows as the self
    time of the Python frame that called it.
    """
    data = json.loads(path.read_text())
    names = [_frame_name(frame) for frame in data["shared"]["frames"]]
    groups: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    busy: dict[str, float] = {}
    for prof in data["profiles"]:
        group = "event loop (MainThread)" if "MainThread" in prof["name"] else "other threads"
        self_count, total_count = groups.setdefault(group, ({}, {}))
        thread_busy = 0.0
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            thread_busy += weight
            functions = [names[i] for i in stack if not names[i].startswith("process ")]
            if functions:
                self_count[functions[-1]] = self_count.get(functions[-1], 0) + weight
            for function in set(functions):
                total_count[function] = total_count.get(function, 0) + weight
        busy[prof["name"]] = busy.get(prof["name"], 0) + thread_busy
    print("\n| thread | busy s |\n|---|---:|")
    for thread, seconds in sorted(busy.items(), key=lambda kv: -kv[1]):
        print(f"| {thread} | {seconds:.1f} |")
    for group, (self_count, total_count) in sorted(groups.items()):
        whole = sum(self_count.values()) or 1.0
        for title, counts in (("self", self_count), ("inclusive", total_count)):
            print(f"\n| {group}: {title} % | function |\n|---:|---|")
            for function, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
                print(f"| {100 * count / whole:.1f} | {function} |")


def _frame_name(frame: dict[str, Any]) -> str:
    parts = Path(frame.get("file") or "?").parts
    return f"{frame['name']} ({'/'.join(parts[-2:])})"


# ---------------------------------------------------------------- summary


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def summarize(results: Sequence[RunResult], settings: Settings) -> list[dict[str, Any]]:
    """Medians per (MTA, sessions) over the complete runs; failures are counted, not hidden."""
    summary = []
    for sessions in settings.sessions:
        for name in settings.mtas:
            runs = [r for r in results if r.mta == name and r.sessions == sessions]
            if not runs:
                continue
            ok = [r for r in runs if r.ok]

            def med(attr: str, rows: Sequence[RunResult] = ok) -> float | None:
                return _median([getattr(r, attr) for r in rows])

            summary.append(
                {
                    "mta": name,
                    "sessions": sessions,
                    "runs": len(runs),
                    "complete": len(ok),
                    "accepted": med("accepted_rate"),
                    "accepted_range": _range([r.accepted_rate for r in ok]),
                    "delivered": med("delivered_rate"),
                    "delivered_range": _range([r.delivered_rate for r in ok]),
                    "mta_cpu_s": med("mta_cpu_s"),
                    # CPU seconds per second of the run: ~1 for a one-process MTA that is
                    # CPU-bound; well below 1, it was waiting (for the disk, mostly).
                    "mta_cores": _median(
                        [r.mta_cpu_s / r.delivered_s for r in ok if r.mta_cpu_s and r.delivered_s]
                    ),
                    "cpu_ms_per_msg": (
                        round(1000 * c / settings.n, 2) if (c := med("mta_cpu_s")) else None
                    ),
                    "peak_hwm_mb": med("peak_hwm_mb"),
                    "peak_pss_mb": med("peak_pss_mb"),
                    "other_cpu_s": med("other_cpu_s", runs),
                    "disk_busy_pct": med("disk_busy_pct", runs),
                    "failures": [f"run {r.run}: {r.failure}" for r in runs if not r.ok],
                }
            )
    return summary


def _range(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{min(present):,.0f}-{max(present):,.0f}" if present else "n/a"


def ratios(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """smtpq's medians divided by each peer's, per session count."""
    rows = []
    by_key = {(s["mta"], s["sessions"]): s for s in summary}
    for (name, sessions), row in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        if not is_smtpq(name):
            continue
        for peer in ("postfix", "slimta"):
            other = by_key.get((peer, sessions))
            if other is None:
                continue
            rows.append(
                {
                    "ratio": f"{name}/{peer}",
                    "sessions": sessions,
                    "accepted": _div(row["accepted"], other["accepted"]),
                    "delivered": _div(row["delivered"], other["delivered"]),
                    "cpu_per_msg": _div(row["cpu_ms_per_msg"], other["cpu_ms_per_msg"]),
                }
            )
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def print_tables(summary: Sequence[dict[str, Any]], ratio_rows: Sequence[dict[str, Any]]) -> None:
    """Markdown tables on stdout."""
    print(
        "\n| MTA | sessions | complete | accepted msgs/s (min-max) | delivered msgs/s (min-max)"
        " | MTA CPU s | MTA cores | CPU ms/msg | peak RSS MB (sum VmHWM) | peak PSS MB"
        " | other CPU s"
        " | disk busy % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(
            f"| {s['mta']} | {s['sessions']} | {s['complete']}/{s['runs']}"
            f" | {_fmt(s['accepted'])} ({s['accepted_range']})"
            f" | {_fmt(s['delivered'])} ({s['delivered_range']})"
            f" | {_fmt(s['mta_cpu_s'], 2)} | {_fmt(s['mta_cores'], 2)}"
            f" | {_fmt(s['cpu_ms_per_msg'], 2)}"
            f" | {_fmt(s['peak_hwm_mb'], 1)} | {_fmt(s['peak_pss_mb'], 1)}"
            f" | {_fmt(s['other_cpu_s'], 1)} | {_fmt(s['disk_busy_pct'])} |"
        )
    if ratio_rows:
        print(
            "\n| ratio | sessions | accepted | delivered | CPU per msg |\n|---|---:|---:|---:|---:|"
        )
        for r in ratio_rows:
            print(
                f"| {r['ratio']} | {r['sessions']} | {_fmt(r['accepted'], 2)}"
                f" | {_fmt(r['delivered'], 2)} | {_fmt(r['cpu_per_msg'], 2)} |"
            )
    for s in summary:
        for failure in s["failures"]:
            print(f"FAILED {s['mta']} sessions={s['sessions']} {failure}")


def environment(settings: Settings) -> dict[str, Any]:
    """Versions and machine facts for the record."""
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "settings": {k: str(v) for k, v in asdict(settings).items()},
    }
    if "postfix" in settings.mtas:
        meta["postfix"] = run(["postconf", "-h", "mail_version"], check=False, quiet=True).strip()
    if "slimta" in settings.mtas:
        code = "import importlib.metadata as m; print(m.version('python-slimta'))"
        python = str(SLIMTA_VENV / "bin" / "python")
        meta["slimta"] = run([python, "-c", code], check=False, quiet=True).strip()
    with contextlib.suppress(OSError):
        meta["smtpq_commit"] = run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], check=False, quiet=True
        ).strip()
    return meta


# ---------------------------------------------------------------- main


def is_smtpq(name: str) -> bool:
    """``smtpq`` or ``smtpq-wN``."""
    return _SMTPQ_WORKERS.fullmatch(name) is not None


def make_mta(name: str, settings: Settings) -> Mta:
    """The runner for one MTA name."""
    if name == "postfix":
        return PostfixMta(settings)
    if name == "direct":
        return DirectMta()
    return ChildMta(name, settings)


def check_tools(settings: Settings) -> None:
    """Fail early, with the fix, if something the selected MTAs need is missing."""
    missing = [tool for tool in (SMTP_SOURCE, SMTP_SINK) if not Path(tool).exists()]
    if "slimta" in settings.mtas and not (SLIMTA_VENV / "bin" / "python").exists():
        missing.append(str(SLIMTA_VENV / "bin" / "python"))
    smtpq = settings.smtpq_command()[0]
    if any(map(is_smtpq, settings.mtas)) and not shutil.which(smtpq):
        missing.append(smtpq)
    if missing:
        raise BenchError(f"missing {', '.join(missing)}; run with --setup first")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    """Command line -> (namespace, Settings)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (bench/e2e.py) and bench/README.md.",
    )
    parser.add_argument("--setup", action="store_true", help="install/configure, then exit")
    parser.add_argument("--all", action="store_true", help="--setup, then run the full matrix")
    parser.add_argument("--mta", default=",".join(MTAS), help="comma list of " + ",".join(MTAS))
    parser.add_argument("--sessions", default="1,10,50", help="comma list of session counts")
    parser.add_argument("-n", type=int, default=5000, help="messages per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048, help="message size (smtp-source -l)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    parser.add_argument("--mta-port", type=int, default=2535)
    parser.add_argument("--sink-port", type=int, default=2536)
    parser.add_argument("--json-out", type=Path, help="write every run and the summary here")
    parser.add_argument("--workdir", type=Path, help="logs and queues (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--smtpq-venv", type=Path, default=REPO / ".venv")
    parser.add_argument("--smtpq-cmd", help="command to run instead of <venv>/bin/smtpq")
    parser.add_argument("--smtpq-workers", type=int, default=1)
    parser.add_argument(
        "--smtpq-sync",
        choices=("auto", "fsync", "syncfs", "none"),
        help="storage.sync (default: the product's); none is not durable (diagnosis only)",
    )
    parser.add_argument("--slimta-relay-pool", type=int, default=20)
    parser.add_argument("--profile", type=Path, help="one smtpq run under py-spy; output file")
    parser.add_argument("--py-spy", default="py-spy", help="py-spy executable for --profile")
    args = parser.parse_args(argv)
    mtas = tuple(m.strip() for m in args.mta.split(",") if m.strip())
    unknown = {m for m in mtas if m not in MTAS and not _SMTPQ_WORKERS.fullmatch(m)}
    if unknown:
        parser.error(f"unknown MTA {', '.join(sorted(unknown))}")
    settings = Settings(
        n=args.n,
        size=args.size,
        runs=args.runs,
        sessions=tuple(int(s) for s in args.sessions.split(",")),
        mtas=("smtpq",) if args.profile else mtas,
        mta_port=args.mta_port,
        sink_port=args.sink_port,
        timeout=args.timeout,
        smtpq_venv=args.smtpq_venv,
        smtpq_cmd=tuple(shlex.split(args.smtpq_cmd)) if args.smtpq_cmd else (),
        smtpq_workers=args.smtpq_workers,
        smtpq_sync=args.smtpq_sync,
        slimta_relay_pool=args.slimta_relay_pool,
    )
    return args, settings


@contextlib.contextmanager
def workdir(path: Path | None, keep: bool) -> Iterator[Path]:
    """The run directory: the given one, or a temp dir removed afterwards unless --keep."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    made = Path(tempfile.mkdtemp(prefix="smtpq-e2e-"))
    try:
        yield made
    finally:
        if keep:
            log(f"logs kept in {made}")
        else:
            shutil.rmtree(made, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 if any run failed)."""
    args, settings = parse_args(argv)
    try:
        if args.setup or args.all:
            setup(settings)
            if args.setup:
                return 0
        check_tools(settings)
        with workdir(args.workdir, args.keep) as base:
            settings.workdir = base
            if args.profile:
                profile(settings, args.py_spy, args.profile, settings.sessions[-1])
                return 0
            return bench(settings, args.json_out)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2


def bench(settings: Settings, json_out: Path | None) -> int:
    """The whole matrix, interleaved; prints the tables and writes the JSON."""
    meta = environment(settings)
    if "postfix" in settings.mtas:
        configure_postfix(settings.mta_port, settings.sink_port)
    mtas = [make_mta(name, settings) for name in settings.mtas]
    results: list[RunResult] = []
    for sessions in settings.sessions:
        for index in range(1, settings.runs + 1):
            for mta in mtas:
                try:
                    result = one_run(mta, sessions, index, settings)
                except BenchError as exc:
                    log(f"{mta.name} sessions={sessions} run {index}: {exc}")
                    continue
                results.append(result)
                log(
                    f"{mta.name:7s} s={sessions:<3d} run {index}:"
                    f" accepted {result.accepted_rate:8.1f}/s,"
                    f" delivered {_fmt(result.delivered_rate, 1):>8s}/s,"
                    f" cpu {_fmt(result.mta_cpu_s, 2)} s, other {result.other_cpu_s:.1f} s,"
                    f" disk busy {_fmt(result.disk_busy_pct)} %,"
                    f" load {result.loadavg_start:.2f}"
                    + (f"  FAILED: {result.failure}" if result.failure else "")
                )
    summary = summarize(results, settings)
    ratio_rows = ratios(summary)
    print(f"\nN={settings.n} size={settings.size} runs={settings.runs} date={meta['date']}")
    custom = (settings.smtpq_sync, settings.smtpq_workers) != (None, 1)
    if custom and any(map(is_smtpq, settings.mtas)):
        sync = settings.smtpq_sync or "(default)"
        print(f"smtpq: storage.sync = {sync}, workers (plain smtpq) = {settings.smtpq_workers}")
    print_tables(summary, ratio_rows)
    if json_out is not None:
        document = {
            "meta": meta,
            "summary": summary,
            "ratios": ratio_rows,
            "runs": [asdict(r) for r in results],
        }
        json_out.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r.ok for r in results) and len(results) == expected(settings) else 1


def expected(settings: Settings) -> int:
    """How many runs the matrix has."""
    return len(settings.sessions) * settings.runs * len(settings.mtas)


if __name__ == "__main__":
    sys.exit(main())
