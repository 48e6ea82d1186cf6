"""How long a client waits for the ``250`` after its message's final dot, through ``smtpq
serve`` at one session: the latency a sending MTA sees per message.

One command (from the repository root, after ``make``; needs Postfix's smtp-sink)::

    .venv/bin/python bench/reply_latency.py                          # this checkout, 3 rounds
    .venv/bin/python bench/reply_latency.py --src ../base/src, -n 2000 --rounds 5

``smtpq serve`` (one worker, the configuration of ``bench/e2e.py``: durable disk storage, a
smarthost) relays to ``smtp-sink``. A client in this process (``smtplib``) sends N messages of
about 2 KB one after the other, a new connection each (EHLO, MAIL, RCPT, DATA, QUIT), and
times each ``DATA`` from the command to the reply after the content: storing the message
durably and whatever else the daemon does before it answers. ``--src`` takes a comma list of
checkouts' ``src`` directories (empty: this checkout), measured in turn in each round under
the same interpreter and libraries, so that machine noise falls on both alike. Per code: the
median over the rounds of each round's median and 90th percentile, and the rounds' median
msgs/s (the client is Python: its own time is in that figure, the same for every code).
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from instructions import free_port, src_env, start_sink, wait_for

import e2e


def message(size: int) -> bytes:
    """A message of about ``size`` bytes, its body in lines of 78 characters (RFC 5322)."""
    head = b"From: <%s>\r\nTo: <%s>\r\nSubject: latency\r\n\r\n" % (
        e2e.SENDER.encode(),
        e2e.RECIPIENT.encode(),
    )
    lines = max(1, (size - len(head)) // 80)
    return head + (b"x" * 78 + b"\r\n") * lines


def quantiles(samples: Sequence[float]) -> tuple[float, float]:
    """The median and the 90th percentile (nearest rank) of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(0, -(-9 * len(ordered) // 10) - 1)  # ceil(0.9 n) - 1
    return statistics.median(ordered), ordered[rank]


def send(port: int, n: int, body: bytes) -> tuple[list[float], float]:
    """N messages to 127.0.0.1:``port``: each DATA's seconds to its 250, and msgs/s."""
    waits: list[float] = []
    started = time.perf_counter()
    for _ in range(n):
        with smtplib.SMTP(e2e.HOST, port) as client:
            client.ehlo("client.bench.localdomain")
            client.mail(e2e.SENDER)
            client.rcpt(e2e.RECIPIENT)
            before = time.perf_counter()
            code, text = client.data(body)
            waits.append(time.perf_counter() - before)
            if code != 250:
                raise SystemExit(f"DATA answered {code} {text!r}")
    return waits, n / (time.perf_counter() - started)


def one_round(work: Path, src: str, n: int, body: bytes) -> tuple[list[float], float]:
    """One ``smtpq serve`` of the code in ``src`` (empty: this checkout), loaded with N."""
    sink_port, port = free_port(), free_port()
    config = work / "smtpq.toml"
    queue = Path(tempfile.mkdtemp(dir=work))
    config.write_text(e2e.smtpq_config(listen_port=port, sink_port=sink_port, queue_dir=queue))
    sink = start_sink(sink_port)
    env = src_env(src)
    smtpq = Path(sys.executable).parent / "smtpq"
    with open(work / "serve.log", "ab") as log:
        serve = subprocess.Popen(
            [sys.executable, str(smtpq), "serve", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: e2e.port_open(port), 60, "smtpq serve did not listen")
        return send(port, n, body)
    finally:
        e2e.stop_pid(serve.pid)
        serve.wait()
        sink.terminate()
        sink.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--src", default="", help="comma list of src directories (empty: ours)")
    opts = parser.parse_args()
    codes = opts.src.split(",")
    body = message(opts.size)
    rows: dict[str, list[tuple[float, float, float]]] = {code: [] for code in codes}
    with tempfile.TemporaryDirectory(prefix="smtpq-latency-") as tmp:
        for index in range(opts.rounds):
            for code in codes:
                waits, rate = one_round(Path(tmp), code, opts.n, body)
                median, p90 = quantiles(waits)
                rows[code].append((median, p90, rate))
                print(
                    f"round {index + 1} {code or 'this checkout'}: DATA to 250 median "
                    f"{median * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms; {rate:.0f} msgs/s",
                    flush=True,
                )
    print("\n| code | DATA to 250, median ms | p90 ms | msgs/s |\n|---|---:|---:|---:|")
    for code, runs in rows.items():
        median, p90, rate = (statistics.median(run[i] for run in runs) for i in range(3))
        name = code or "this checkout"
        print(f"| {name} | {median * 1e3:.3f} | {p90 * 1e3:.3f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
