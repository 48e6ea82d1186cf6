"""bench/destinations.py's own logic: the daemon's config it writes, and its summary."""

from __future__ import annotations

import socket
import time
import tomllib
from pathlib import Path

import destinations

from smtpq.daemon.config import build_config
from smtpq.envelope import Envelope
from smtpq.relay.mx import MxSmtpRelay, Route


def test_the_config_routes_each_domain_to_its_own_destination(tmp_path: Path) -> None:
    args = destinations.parse_args(["--connect-timeout", "7", "--sync", "none"])
    config = build_config(
        tomllib.loads(destinations.smtpq_config(2600, 2601, 2602, tmp_path, args))
    )
    assert config.mx.routes["ok.bench"] == Route("127.0.0.1", 2601)
    assert config.mx.routes["hole.bench"] == Route("127.0.0.1", 2602)
    assert (config.smtp.connect_timeout, config.storage.sync) == (7.0, "none")
    relay = MxSmtpRelay(config.mx, config.smtp)
    env = Envelope("a@origin.bench", ["x@hole.bench", "y@ok.bench"])
    assert dict(relay.destinations(env)) == {
        "127.0.0.1:2602": ["x@hole.bench"],
        "127.0.0.1:2601": ["y@ok.bench"],
    }


def test_the_black_hole_accepts_and_never_answers() -> None:
    hole = destinations.BlackHole(destinations.free_port())
    hole.start()
    try:
        with socket.create_connection(("127.0.0.1", hole.port), timeout=5) as conn:
            conn.settimeout(0.2)
            try:
                data = conn.recv(10)
            except TimeoutError:
                data = None
            assert data is None  # silence, not a close
            for _ in range(100):
                if hole.accepted:
                    break
                time.sleep(0.01)
            assert hole.accepted == 1
    finally:
        hole.stop()


def test_the_summary_is_the_ratio_of_medians_of_complete_runs() -> None:
    def run(kind: str, rate: float | None, failure: str | None = None) -> destinations.RunResult:
        return destinations.RunResult(kind, 1, 900, 100, 1.0, rate, 5, 5, failure)

    results = [
        run("healthy", 1000.0), run("healthy", 800.0), run("mixed", 900.0),
        run("mixed", 10.0, failure="sink had 3/900"),
    ]  # fmt: skip
    summary = destinations.summarize(results)
    assert (summary["healthy_rate"], summary["mixed_rate"], summary["ratio"]) == (900.0, 900.0, 1.0)
    assert summary["hole_connections_during"] == 5
