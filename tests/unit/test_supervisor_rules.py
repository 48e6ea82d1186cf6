"""The supervisor's restart back-off, the log formats, and sd_notify's datagrams."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

import pytest

from smtpq.daemon.logs import JsonFormatter
from smtpq.daemon.notify import Notifier
from smtpq.daemon.supervisor import restart_delay


def test_restart_delay_doubles_from_half_a_second_up_to_half_a_minute() -> None:
    assert [restart_delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(1000) == 30


def test_json_log_records_are_one_object_per_line() -> None:
    record = logging.LogRecord("smtpq.queue", logging.WARNING, __file__, 1, "a %s\nb", ("x",), None)
    record.created = 0.0
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "1970-01-01T00:00:00Z",
        "level": "WARNING",
        "logger": "smtpq.queue",
        "pid": record.process,
        "message": "a x\nb",
    }
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter().format(record))
    assert data["exception"].startswith("Traceback")
    assert "ValueError: boom" in data["exception"]


@pytest.fixture
def manager(tmp_path: Path) -> socket.socket:
    """A service manager's notification socket (a datagram socket, as systemd's)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    return sock


def test_notifier_sends_each_state_as_a_datagram(manager: socket.socket, tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "notify"))
    notifier.ready()
    assert manager.recv(4096) == b"READY=1"
    notifier.reloading()
    state, usec = manager.recv(4096).decode().split("\n")
    assert state == "RELOADING=1"
    assert usec.startswith("MONOTONIC_USEC=")
    assert int(usec.partition("=")[2]) > 0
    notifier.stopping()
    assert manager.recv(4096) == b"STOPPING=1"
    manager.close()


def test_notifier_without_a_manager_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    Notifier("").ready()  # no socket: a no-op
    Notifier("/nonexistent/notify").ready()  # a broken one: a warning, never an exception
    assert "cannot notify the service manager" in caplog.text


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"smtpq-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier("@" + name).ready("serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
