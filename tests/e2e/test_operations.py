"""``smtpq queue ...`` against a queue filled by a real daemon (disk, journal and Redis
storage)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess
from tests.helpers import until
from tests.integration.smtp.conftest import free_port
from tests.integration.smtp.sink import Sink
from tests.redis_server import RedisServer


@pytest.fixture(params=["disk", "journal", "redis"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The daemon's storage settings: disk, a journal, or a prefix of its own on the private
    Redis."""
    if request.param in ("disk", "journal"):
        return {"type": request.param}
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")
    return {"type": "redis", "url": server.url, "prefix": prefix, "lease_timeout": 5.0}


async def send(daemon: DaemonProcess, rcpts: list[str], tag: str) -> None:
    message = (
        f"From: <alice@origin.example>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@origin.example>"
        "\r\n\r\nbody\r\n"
    ).encode()
    errors, _ = await aiosmtplib.send(
        message, sender="alice@origin.example", recipients=rcpts,
        hostname="127.0.0.1", port=daemon.port, start_tls=False,
    )  # fmt: skip
    assert errors == {}


async def listing(daemon: DaemonProcess, *args: str) -> list[dict[str, Any]]:
    code, out, err = await daemon.cli("queue", "list", "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_queue_commands(
    daemon_factory: DaemonFactory, sink: Sink, storage: dict[str, Any]
) -> None:
    sink.behaviour.rcpt["stuck"] = "451 4.2.1 Mailbox busy"
    daemon = await daemon_factory(
        {
            "storage": storage,
            "routes": {
                "dest.example": f"[127.0.0.1]:{sink.port}",
                "origin.example": f"[127.0.0.1]:{free_port()}",  # down: bounces stay queued
            },
            # Retries far apart: the messages stay put while the commands run.
            "retry": {"initial": 3600.0, "maximum": 3600.0},
        }
    )
    await send(daemon, ["stuck@dest.example", "ok@dest.example"], "m1")
    await send(daemon, ["stuck@dest.example"], "m2")
    await send(daemon, ["stuck@dest.example"], "m3")
    await until(lambda: len(sink.received) == 1, timeout=30)

    async def queued() -> list[dict[str, Any]]:
        return await listing(daemon)

    messages: list[dict[str, Any]] = []

    async def three_deferred() -> bool:
        messages[:] = await queued()
        return len(messages) == 3 and all(m["attempts"] == 1 for m in messages)

    for _ in range(200):
        if await three_deferred():
            break
    assert len(messages) == 3
    m1, m2, _m3 = (m["id"] for m in messages)
    assert messages[0]["recipients"] == ["stuck@dest.example"]  # ok@ was delivered
    assert messages[0]["last_reply"] == "451 4.2.1 Mailbox busy"

    # mailq-style text and show
    code, out, _ = await daemon.cli("queue", "list")
    assert code == 0
    assert m1 in out
    size = sum(m["size"] for m in messages)
    assert f"-- {-(-size // 1024)} Kbytes in 3 messages" in out
    code, out, _ = await daemon.cli("queue", "show", m1, "--body")
    assert code == 0
    assert "<ok@dest.example> done" in out
    assert "<stuck@dest.example> pending" in out
    assert "Subject: m1" in out
    assert "body" in out
    code, _, err = await daemon.cli("queue", "show", "0" * 32)
    assert code == 1
    assert "no message" in err

    # shape: three recipients at stuck's domain, young, with the reply that holds them
    code, out, _ = await daemon.cli("queue", "shape", "--json")
    shape = json.loads(out)
    assert shape["rows"] == [
        {"domain": "dest.example", "counts": [3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
    ]
    assert shape["replies"]["dest.example"] == [["451 4.2.1 Mailbox busy", 3]]

    # hold survives a restart and blocks attempts; release and flush deliver
    assert (await daemon.cli("queue", "hold", m2))[0] == 0
    assert (await daemon.stop()) == 0
    await daemon.start()
    held = await listing(daemon, "--state", "held")
    assert [m["id"] for m in held] == [m2]
    del sink.behaviour.rcpt["stuck"]
    code, out, _ = await daemon.cli("queue", "flush", "--all")
    assert code == 0
    await until(lambda: len(sink.received) == 3, timeout=30)  # m1 and m3, not the held m2
    assert {r.data.split(b"Subject: ")[1][:2] for r in sink.received[1:]} == {b"m1", b"m3"}
    assert [m["id"] for m in await queued()] == [m2]
    assert (await daemon.cli("queue", "release", m2))[0] == 0
    await daemon.cli("queue", "flush", m2)
    await until(lambda: len(sink.received) == 4, timeout=30)

    # delete makes a message vanish everywhere; bounce sends a DSN to the sender
    sink.behaviour.rcpt["stuck"] = "451 4.2.1 Mailbox busy"
    await send(daemon, ["stuck@dest.example"], "m4")
    await send(daemon, ["stuck@dest.example"], "m5")
    for _ in range(200):
        pending = await queued()
        if len(pending) == 2 and all(m["attempts"] == 1 for m in pending):
            break
    m4, m5 = (m["id"] for m in pending)
    code, out, _ = await daemon.cli("queue", "delete", m4)
    assert code == 0
    assert "delete: 1 message" in out
    assert [m["id"] for m in await queued()] == [m5]
    code, _, _ = await daemon.cli("queue", "show", m4)
    assert code == 1
    code, _, _ = await daemon.cli("queue", "delete", "--all")  # needs --yes without a tty
    assert code != 0
    # Bounce: the DSN is queued for the sender's domain (whose host is down).
    code, out, _ = await daemon.cli("queue", "bounce", m5, "--yes")
    assert code == 0
    [dsn] = await queued()
    assert dsn["sender"] == ""
    assert dsn["recipients"] == ["alice@origin.example"]
    code, _, _ = await daemon.cli("queue", "delete", "--all", "--yes")
    assert code == 0
    assert await queued() == []
    assert len(sink.received) == 4  # nothing deleted was delivered


async def scrape(port: int, token: str | None) -> tuple[int, dict[str, float]]:
    """GET /metrics over TCP; the status and the unlabelled samples (plus queue gauges)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status != 200:
        return status, {}
    samples = {
        s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    return status, samples


async def test_metrics_match_the_sink(daemon_factory: DaemonFactory, sink: Sink) -> None:
    admin_port = free_port()
    daemon = await daemon_factory(
        {
            "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}", "token": "s3cret"},
        }
    )
    for n in range(5):
        await send(daemon, ["a@dest.example", "b@dest.example"], f"x{n}")
    await until(lambda: len(sink.received) == 5, timeout=30)
    assert (await scrape(admin_port, None))[0] == 401
    assert (await scrape(admin_port, "wrong"))[0] == 401
    samples: dict[str, float] = {}
    async with asyncio.timeout(30):  # the sink answers DATA before the queue records it
        while samples.get("smtpq_recipients_delivered_total") != 10:
            status, samples = await scrape(admin_port, "s3cret")
            assert status == 200
    delivered = sum(len(r.recipients) for r in sink.received)
    assert samples["smtpq_recipients_delivered_total"] == delivered == 10
    assert samples["smtpq_messages_accepted_total"] == 5
    assert samples["smtpq_recipients_bounced_total"] == 0
    assert samples["smtpq_delivery_attempt_seconds_count"] == 5
    assert samples["smtpq_storage_write_seconds_count"] == 5
    assert samples["smtpq_queue_messages{deferred}"] == 0
