"""``smtpq config check`` and ``smtpq config show``: the output is what ``serve -c`` runs."""

from __future__ import annotations

import json
import signal
import tomllib

from tests.e2e.conftest import DaemonFactory
from tests.integration.smtp.conftest import TlsFiles
from tests.unit.test_config import example_from_docstring


async def test_config_check(daemon_factory: DaemonFactory) -> None:
    daemon = await daemon_factory({}, start=False)
    code, out, err = await daemon.cli("config", "check")
    assert (code, out, err) == (0, f"smtpq: configuration {daemon.config} is valid\n", "")
    daemon.rewrite({"retry": {"initial": "soon"}})
    code, out, err = await daemon.cli("config", "check")
    assert (code, out) == (2, "")
    assert err == "smtpq: configuration error: retry.initial must be a number\n"


async def test_config_show_is_accepted_by_serve_and_reads_back_the_same(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory(
        {"workers": 2, "routes": {"dest.example": "[127.0.0.1]:2999"}}, start=False
    )
    code, shown, err = await daemon.cli("config", "show")
    assert code == 0, err
    data = tomllib.loads(shown)
    assert data["workers"] == 2
    assert data["routes"] == {"dest.example": "127.0.0.1:2999"}
    assert data["smtp"]["tls"] == "opportunistic"  # defaults are shown too
    assert data["edge"]["max_message_size"] == 25 * 1024 * 1024
    daemon.config.write_text(shown)
    code, again, err = await daemon.cli("config", "show")
    assert (code, again) == (0, shown), err
    await daemon.start()
    await daemon.logged("all 2 workers ready")
    assert await daemon.stop(signal.SIGTERM) == 0


async def test_the_documented_example_uncommented_is_a_valid_config(
    daemon_factory: DaemonFactory, tls_files: TlsFiles
) -> None:
    daemon = await daemon_factory({}, start=False)
    credentials = daemon.tmp / "passwd"
    credentials.write_text("")
    text = (
        example_from_docstring(uncomment=True)
        .replace("/etc/smtpq/cert.pem", str(tls_files.cert))
        .replace("/etc/smtpq/key.pem", str(tls_files.key))
        .replace("/etc/smtpq/passwd", str(credentials))
    )
    daemon.config.write_text(text)
    code, out, err = await daemon.cli("config", "check")
    assert (code, err) == (0, ""), err
    code, out, err = await daemon.cli("config", "show", "--hide-secrets")
    assert code == 0
    assert "change-me" not in out
    assert "secret" not in out
    assert "# token = (hidden)" in out


async def test_json_logs_are_one_object_per_line(daemon_factory: DaemonFactory) -> None:
    daemon = await daemon_factory({"workers": 2, "log_format": "json"})
    await daemon.logged('"all 2 workers ready"')
    assert await daemon.stop(signal.SIGTERM) == 0
    records = [json.loads(line) for line in daemon.logs().splitlines()]
    assert {r["logger"] for r in records} >= {"smtpq.daemon.supervisor", "smtpq.daemon.worker"}
    assert len({r["pid"] for r in records}) == 3
    assert all(set(r) == {"time", "level", "logger", "pid", "message"} for r in records)
    assert "smtpq stopped" in {r["message"] for r in records}
