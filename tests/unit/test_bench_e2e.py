"""The end-to-end benchmark's own logic: smtpq config, sink counter, accounting, summary.

bench/e2e.py is a script, not part of the package; pytest finds it through ``pythonpath``.
The runs themselves (Postfix, slimta, smtp-source) are not exercised here: they need root and
minutes; these tests keep the parts that decide the figures honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import e2e
from smtpq.daemon.config import build_config


def test_smtpq_config_is_accepted_by_the_daemon(tmp_path: Path) -> None:
    text = e2e.smtpq_config(listen_port=2600, sink_port=2601, queue_dir=tmp_path, workers=2)
    config = build_config(tomllib.loads(text))
    assert config.listen == ("127.0.0.1:2600",)
    assert not config.edge.reverse_lookup  # as Postfix here: smtpd_peername_lookup = no
    assert config.storage.type == "disk"
    assert config.storage.path == str(tmp_path)
    assert config.storage.sync == "auto"  # the durable default
    assert (config.relay.type, config.relay.host, config.relay.port) == (
        "smarthost",
        "127.0.0.1",
        2601,
    )
    assert config.workers == 2
    unsafe = e2e.smtpq_config(listen_port=1, sink_port=2, queue_dir=tmp_path, sync="none")
    assert build_config(tomllib.loads(unsafe)).storage.sync == "none"


def test_sink_counter_takes_the_last_complete_record() -> None:
    data = b"sess=1 quit=1 mesg=1\rsess=1 quit=1 mesg=2\rsess=2 qu"
    assert e2e.sink_counter(data) == (2, b"sess=2 qu")
    # The rest completes with the next chunk.
    assert e2e.sink_counter(b"sess=2 qu" + b"it=2 mesg=3\r") == (3, b"")
    assert e2e.sink_counter(b"sess=0 qu") == (None, b"sess=0 qu")


def test_tree_accounting_sees_children_and_their_cpu() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in e2e.tree_pids(os.getpid())
        assert e2e.tree_pids(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert child.pid not in e2e.tree_pids(os.getpid())
    assert e2e.process_cpu(os.getpid()) > 0
    assert e2e.tree_cpu(os.getpid()) >= e2e.process_cpu(os.getpid())
    assert (e2e.disk_busy_ms(Path(__file__)) or 0) >= 0


def _result(
    mta: str, sessions: int, run: int, delivered: float | None, cpu: float
) -> e2e.RunResult:
    return e2e.RunResult(
        mta=mta,
        sessions=sessions,
        run=run,
        n=1000,
        accepted_s=1.0,
        delivered_s=None if delivered is None else 1000 / delivered,
        accepted_rate=1000.0,
        delivered_rate=delivered,
        sink_count=1000 if delivered else 990,
        source_rc=0,
        mta_cpu_s=cpu,
        peak_hwm_mb=50.0,
        peak_pss_mb=40.0,
        source_cpu_s=0.1,
        sink_cpu_s=0.1,
        harness_cpu_s=0.1,
        other_cpu_s=0.0,
        disk_busy_pct=10.0,
        loadavg_start=1.0,
        leftover=0,
        failure=None if delivered else "sink had 990/1000 after 600 s",
    )


def test_summary_takes_medians_of_complete_runs_and_lists_failures() -> None:
    settings = e2e.Settings(n=1000, runs=3, sessions=(50,), mtas=("smtpq", "postfix"))
    results = [
        _result("smtpq", 50, 1, 900.0, 1.0),
        _result("smtpq", 50, 2, None, 9.0),
        _result("smtpq", 50, 3, 1100.0, 2.0),
        _result("postfix", 50, 1, 400.0, 3.0),
        _result("postfix", 50, 2, 500.0, 3.0),
        _result("postfix", 50, 3, 450.0, 4.0),
    ]
    summary = e2e.summarize(results, settings)
    smtpq = next(s for s in summary if s["mta"] == "smtpq")
    assert (smtpq["complete"], smtpq["runs"]) == (2, 3)
    assert smtpq["delivered"] == 1000.0  # median of 900 and 1100; the failed run is left out
    assert smtpq["mta_cpu_s"] == 1.5
    assert smtpq["mta_cores"] == pytest.approx(1.55)  # 0.9 and 2.2 CPU s per second
    assert smtpq["failures"] == ["run 2: sink had 990/1000 after 600 s"]
    ratio = e2e.ratios(summary)
    assert ratio == [
        {
            "ratio": "smtpq/postfix",
            "sessions": 50,
            "accepted": 1.0,
            "delivered": round(1000 / 450, 2),
            "cpu_per_msg": 0.5,
        }
    ]


def test_smtpq_worker_variants(tmp_path: Path) -> None:
    settings = e2e.Settings(mtas=("smtpq", "smtpq-w2"), smtpq_workers=1)
    one, two = (e2e.make_mta(name, settings) for name in settings.mtas)
    assert isinstance(one, e2e.ChildMta)
    assert isinstance(two, e2e.ChildMta)
    assert (one.workers, two.workers) == (1, 2)
    two.command(tmp_path, tmp_path / "queue")
    assert tomllib.loads((tmp_path / "smtpq.toml").read_text())["workers"] == 2
    assert [e2e.is_smtpq(n) for n in ("smtpq", "smtpq-w12", "smtpq-w0", "postfix")] == [
        True,
        True,
        False,
        False,
    ]


def test_profile_summary_merges_lines_per_function(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = [
        {"name": "main", "file": "/x/app/server.py", "line": 1},
        {"name": "commit", "file": "/x/app/disk.py", "line": 10},
        {"name": "commit", "file": "/x/app/disk.py", "line": 12},
    ]
    profile = {
        "shared": {"frames": frames},
        "profiles": [
            {
                "name": 'Process 1 Thread 1 "MainThread"',
                "samples": [[0, 1], [0, 2], [0]],
                "weights": [1, 1, 2],
            },
            {"name": 'Process 1 Thread 2 "io_0"', "samples": [[1]], "weights": [3]},
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    e2e.print_profile(path)
    out = capsys.readouterr().out
    loop, rest = out.split("other threads", 1)
    assert "| 50.0 | commit (app/disk.py) |" in loop  # self: two one-sample lines merged
    assert "| 100.0 | main (app/server.py) |" in loop  # inclusive
    assert "| 100.0 | commit (app/disk.py) |" in rest
    assert '| Process 1 Thread 1 "MainThread" | 4.0 |' in out
