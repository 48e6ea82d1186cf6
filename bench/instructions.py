"""Instructions per message through ``smtpq serve`` at one session, counted by callgrind: a
figure that does not move with the machine's load, for telling whether a change to the code
made a message cheaper (the timing benchmarks here need many runs to see 5 %).

One command (from the repository root, after ``make``; needs valgrind and Postfix's
smtp-source and smtp-sink)::

    .venv/bin/python bench/instructions.py                     # disk and journal, 50 and 250
    .venv/bin/python bench/instructions.py --storage disk --src ../other-checkout/src

``smtpq serve`` (one worker, the configuration of ``bench/e2e.py``: durable storage, a
smarthost) runs under ``valgrind --tool=callgrind`` and receives N messages of 2 KB from
``smtp-source -s 1`` (a new connection each) into ``smtp-sink``, delivering each; once its log
names N deliveries it is stopped with SIGTERM. That is done for two counts of messages, and
the instructions per message are the difference of the two totals over the difference of the
counts: start-up and shutdown cancel out. What the kernel does (system calls, the sockets,
the disk) is not counted; what the interpreter and the libraries do in user space is, in
every thread. ``--src`` puts another checkout's ``src`` first on ``PYTHONPATH``: the same
harness, the same interpreter and libraries, the other code.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import e2e

_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def per_message(low: tuple[int, int], high: tuple[int, int]) -> float:
    """Instructions per message from two runs, each ``(messages, instructions)``."""
    (n1, ir1), (n2, ir2) = low, high
    if n2 <= n1:
        raise ValueError("the second run must carry more messages than the first")
    return (ir2 - ir1) / (n2 - n1)


def callgrind_total(path: Path) -> int:
    """The instruction total that callgrind wrote at the end of a run."""
    match = _TOTAL.search(path.read_bytes())
    if match is None:
        raise ValueError(f"{path}: no summary line")
    return int(match.group(1))


def one_run(work: Path, storage: str, n: int, src: str | None) -> int:
    """Instructions of one ``smtpq serve`` run that delivers ``n`` messages."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{storage}-{n}-", dir=work))
    sink_port, port = free_port(), free_port()
    config = run_dir / "smtpq.toml"
    config.write_text(
        e2e.smtpq_config(
            listen_port=port, sink_port=sink_port, queue_dir=run_dir / "queue", storage=storage
        )
    )
    sink = start_sink(sink_port)
    env = src_env(src)
    out, log_path = run_dir / "callgrind.out", run_dir / "serve.log"
    smtpq = Path(sys.executable).parent / "smtpq"
    grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [*grind, sys.executable, str(smtpq), "serve", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: e2e.port_open(port), 300, "smtpq serve did not listen")
        source = [e2e.SMTP_SOURCE, "-s", "1", "-m", str(n), "-l", "2048", "-c"]
        source += ["-f", e2e.SENDER, "-t", e2e.RECIPIENT, f"{e2e.HOST}:{port}"]
        subprocess.run(source, check=True, stdout=subprocess.DEVNULL)
        wait_for(lambda: delivered(log_path) >= n, 300, "the messages were not delivered")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(300)
        sink.terminate()
        sink.wait(10)
    return callgrind_total(out)


def start_sink(port: int) -> subprocess.Popen[bytes]:
    """smtp-sink on loopback ``port`` (as nobody when we are root: it will not run as root)."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    return subprocess.Popen(
        [e2e.SMTP_SINK, *user, f"{e2e.HOST}:{port}", "100"], stdout=subprocess.DEVNULL
    )


def src_env(src: str | None) -> dict[str, str]:
    """Our environment with ``src`` (a checkout's src directory) first on PYTHONPATH."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def delivered(log_path: Path) -> int:
    """How many deliveries the daemon's log names so far."""
    return log_path.read_bytes().count(b" delivered id=")


def wait_for(ready: Callable[[], bool], timeout: float, error: str) -> None:
    """Poll ``ready()`` until it is true, or exit with ``error`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(error)
        time.sleep(0.2)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind((e2e.HOST, 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="disk,journal", help="storage types to measure")
    parser.add_argument("--low", type=int, default=50, help="messages of the first run")
    parser.add_argument("--high", type=int, default=250, help="messages of the second run")
    parser.add_argument("--src", help="a checkout's src directory to measure instead")
    opts = parser.parse_args()
    print("| storage | code | runs | instructions per message |\n|---|---|---|---:|")
    with tempfile.TemporaryDirectory(prefix="smtpq-instructions-") as tmp:
        for storage in opts.storage.split(","):
            runs = [(n, one_run(Path(tmp), storage, n, opts.src)) for n in (opts.low, opts.high)]
            figure = per_message(runs[0], runs[1])
            code = opts.src or "this checkout"
            print(f"| {storage} | {code} | {opts.low}, {opts.high} | {figure:,.0f} |")


if __name__ == "__main__":
    main()
