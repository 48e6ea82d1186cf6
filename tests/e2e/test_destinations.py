"""``smtpq queue destinations`` against a real daemon (disk and Redis storage), and without one."""

from __future__ import annotations

import json
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess
from tests.helpers import until
from tests.integration.smtp.conftest import free_port
from tests.integration.smtp.sink import Sink
from tests.redis_server import RedisServer


@pytest.fixture(params=["disk", "redis"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "disk":
        return {"type": "disk"}
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")
    return {"type": "redis", "url": server.url, "prefix": prefix, "lease_timeout": 5.0}


async def send(daemon: DaemonProcess, rcpt: str, n: int) -> None:
    message = f"From: <a@origin.example>\r\nSubject: {n}\r\n\r\nbody\r\n".encode()
    errors, _ = await aiosmtplib.send(
        message, sender="a@origin.example", recipients=[rcpt],
        hostname="127.0.0.1", port=daemon.port, start_tls=False,
    )  # fmt: skip
    assert errors == {}


async def rows(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    code, out, err = await daemon.cli("queue", "destinations", "--json")
    assert code == 0, err
    return {r["name"]: r for r in json.loads(out)["destinations"]}


async def test_the_destinations_command(
    daemon_factory: DaemonFactory, sink: Sink, storage: dict[str, Any]
) -> None:
    down = free_port()
    daemon = await daemon_factory(
        {
            "storage": storage,
            "routes": {
                "down.example": f"[127.0.0.1]:{down}",
                "up.example": f"[127.0.0.1]:{sink.port}",
                "origin.example": f"[127.0.0.1]:{sink.port}",
            },
            "destinations": {"dead_after": 2, "cool_down": 600},
            "retry": {"initial": 3600.0, "maximum": 3600.0},
        }
    )
    for n in range(3):
        await send(daemon, f"r{n}@down.example", n)
    await send(daemon, "ok@up.example", 9)
    await until(lambda: len(sink.received) == 1, timeout=30)
    dead, up = f"127.0.0.1:{down}", f"127.0.0.1:{sink.port}"
    found: dict[str, dict[str, Any]] = {}
    for _ in range(100):
        found = await rows(daemon)
        if found.get(dead, {}).get("state") == "dead" and found[dead]["queued"] == 3:
            break
    assert found[dead]["state"] == "dead"
    assert found[dead]["queued"] == 3
    assert "connection refused" in found[dead]["last_error"]
    assert found[up]["state"] == "active"
    assert found[up]["queued"] == 0

    code, out, _ = await daemon.cli("queue", "destinations")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("DESTINATION")
    assert lines[1].startswith(dead)
    assert "dead until" in lines[1]
    assert "connection refused" in lines[2]

    # Without the daemon: the stored queue's counts, and the dead mark where it is shared.
    assert await daemon.stop() == 0
    offline = await rows(daemon)
    assert offline[dead]["queued"] == 3
    shared = storage["type"] == "redis"
    assert offline[dead]["state"] == ("dead" if shared else "idle")
