"""``smtpq serve`` as a process: real clients in, a real aiosmtpd sink as the next hop."""

from __future__ import annotations

import asyncio
import contextlib
import email
import functools
import os
import signal
import smtplib
from email.message import Message
from pathlib import Path

import aiosmtplib
import pytest

from tests.e2e.conftest import DaemonFactory
from tests.helpers import until
from tests.integration.smtp.sink import Sink

MESSAGE = (
    b"From: Alice <alice@origin.example>\r\n"
    b"To: bob@dest.example\r\n"
    b"Subject: end to end\r\n"
    b"Message-ID: <e2e-1@origin.example>\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=origin.example; s=x;\r\n"
    b"\th=from:to:subject; bh=abc; b=def\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".A line that starts with a dot.\r\n"
    b"\r\n"
    b"Trailing    spaces   \r\n"
)


def routes_to(sink: Sink, *domains: str) -> dict[str, str]:
    return {d: f"[127.0.0.1]:{sink.port}" for d in domains}


def send_smtplib(
    port: int, sender: str, rcpts: list[str], data: bytes
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test.example")
        return client.sendmail(sender, rcpts, data)


def strip_received(data: bytes) -> bytes:
    """The message without the Received field our daemon prepended (and that field)."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n", 0)
    while data[end + 2 : end + 3] in (b" ", b"\t"):
        end = data.index(b"\r\n", end + 2)
    return data[end + 2 :]


async def test_relay_byte_exact_with_received(daemon_factory: DaemonFactory, sink: Sink) -> None:
    daemon = await daemon_factory({"routes": routes_to(sink, "dest.example")})
    refused = await asyncio.to_thread(
        send_smtplib, daemon.port, "alice@origin.example", ["bob@dest.example"], MESSAGE
    )
    assert refused == {}
    await until(lambda: len(sink.received) == 1, timeout=30)
    got = sink.received[0]
    assert got.sender == "alice@origin.example"
    assert got.recipients == ["bob@dest.example"]
    assert strip_received(got.data) == MESSAGE
    received = got.data.split(b"\r\n", 1)[0]
    assert b"from client.test.example" in received
    assert b"[127.0.0.1]" in received
    assert b"by mx.test.example" in received


async def test_aiosmtplib_multi_domain(daemon_factory: DaemonFactory, sink: Sink) -> None:
    daemon = await daemon_factory({"routes": routes_to(sink, "one.example", "two.example")})
    rcpts = ["a@one.example", "b@two.example", "c@one.example"]
    errors, response = await aiosmtplib.send(
        MESSAGE, sender="alice@origin.example", recipients=rcpts,
        hostname="127.0.0.1", port=daemon.port, start_tls=False,
    )  # fmt: skip
    assert errors == {}
    assert response.startswith("2.6.0 Message accepted for delivery")
    await until(lambda: sum(len(r.recipients) for r in sink.received) == 3, timeout=30)
    delivered = sorted(rcpt for r in sink.received for rcpt in r.recipients)
    assert delivered == sorted(rcpts)
    assert all(strip_received(r.data) == MESSAGE for r in sink.received)


async def test_transient_then_delivered_on_retry(daemon_factory: DaemonFactory, sink: Sink) -> None:
    sink.behaviour.rcpt["slow"] = "451 4.7.1 Greylisted, come back later"
    daemon = await daemon_factory({"routes": routes_to(sink, "dest.example")})
    rcpts = ["slow@dest.example", "fast@dest.example"]
    await asyncio.to_thread(send_smtplib, daemon.port, "alice@origin.example", rcpts, MESSAGE)
    await until(lambda: len(sink.received) == 1, timeout=30)
    assert sink.received[0].recipients == ["fast@dest.example"]
    code, out, _ = await daemon.cli("queue", "list")
    assert code == 0
    assert "451 4.7.1 Greylisted" in out
    assert "<slow@dest.example>" in out
    del sink.behaviour.rcpt["slow"]
    await until(lambda: len(sink.received) == 2, timeout=30)
    assert sink.received[1].recipients == ["slow@dest.example"]
    log = daemon.logs()
    assert "deferred id=" in log
    assert 'reply="451 4.7.1 Greylisted' in log
    assert "delivered id=" in log


async def test_permanent_failure_bounces_to_sender(
    daemon_factory: DaemonFactory, sink: Sink
) -> None:
    sink.behaviour.rcpt["nobody"] = "550 5.1.1 No such user here"
    daemon = await daemon_factory({"routes": routes_to(sink, "dest.example", "origin.example")})
    await asyncio.to_thread(
        send_smtplib, daemon.port, "alice@origin.example", ["nobody@dest.example"], MESSAGE
    )
    await until(lambda: len(sink.received) == 1, timeout=30)
    bounce = sink.received[0]
    assert bounce.sender in ("", "<>")  # aiosmtpd keeps the null path as written
    assert bounce.recipients == ["alice@origin.example"]
    report = email.message_from_bytes(bounce.data)
    assert report.get_content_type() == "multipart/report"
    parts = report.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    assert isinstance(status, Message)
    assert status.get_content_type() == "message/delivery-status"
    text = bounce.data.decode()
    assert "Final-Recipient: rfc822; nobody@dest.example" in text
    assert "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in text
    assert "Remote-MTA: dns;" in text
    assert "Subject: end to end" in text  # the original comes back


async def test_next_hop_down_then_up(daemon_factory: DaemonFactory, sink_factory: object) -> None:
    from tests.integration.smtp.conftest import free_port

    port = free_port()
    daemon = await daemon_factory({"routes": {"dest.example": f"[127.0.0.1]:{port}"}})
    await asyncio.to_thread(
        send_smtplib, daemon.port, "alice@origin.example", ["bob@dest.example"], MESSAGE
    )
    await until(lambda: "deferred id=" in daemon.logs(), timeout=30)
    assert "4.4.1" in daemon.logs()
    sink = await sink_factory(port=port)  # type: ignore[operator]
    await until(lambda: len(sink.received) == 1, timeout=30)
    assert strip_received(sink.received[0].data) == MESSAGE


@pytest.mark.parametrize("storage", ["disk", "journal"])
async def test_sigterm_mid_load_then_restart_loses_nothing(
    daemon_factory: DaemonFactory, sink: Sink, storage: str
) -> None:
    sink.behaviour.rcpt["held"] = "451 4.3.2 Not now"
    daemon = await daemon_factory(
        {
            "routes": routes_to(sink, "dest.example"),
            "retry": {"initial": 1.0, "maximum": 1.0},
            "storage": {"type": storage},
        }
    )
    accepted: list[str] = []

    async def send(n: int) -> None:
        msg = MESSAGE.replace(b"<e2e-1@", f"<load-{n}@".encode())
        rcpts = ["held@dest.example"] if n % 2 else ["bob@dest.example"]
        try:
            await aiosmtplib.send(
                msg, sender="alice@origin.example", recipients=rcpts,
                hostname="127.0.0.1", port=daemon.port, start_tls=False, timeout=30,
            )  # fmt: skip
        except (aiosmtplib.SMTPException, OSError):
            return
        accepted.append(f"load-{n}")

    senders = [asyncio.create_task(send(n)) for n in range(60)]
    await until(lambda: len(accepted) >= 10, timeout=30)
    assert await daemon.stop(signal.SIGTERM) == 0
    await asyncio.gather(*senders)
    sink.behaviour.rcpt.clear()
    await daemon.start()
    expected = set(accepted)

    def delivered() -> set[str]:
        ids = set()
        for r in sink.received:
            for mid in expected:
                if f"<{mid}@".encode() in r.data:
                    ids.add(mid)
        return ids

    await until(lambda: delivered() == expected, timeout=60)
    assert "smtpq stopped" in daemon.logs()


async def test_policy_refusals(daemon_factory: DaemonFactory, sink: Sink) -> None:
    daemon = await daemon_factory(
        {
            "edge": {
                "trusted_networks": [],
                "relay_domains": ["local.example"],
                "max_message_size": 10000,
            },
            "routes": routes_to(sink, "local.example"),
        }
    )
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, start_tls=False)
    async with client:
        await client.ehlo(hostname="client.test.example")
        assert "size" in client.esmtp_extensions
        assert "auth" not in client.esmtp_extensions  # no AUTH without TLS
        await client.mail("alice@origin.example")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("victim@elsewhere.example")
        assert refused.value.code in (550, 554)
        assert "5.7.1" in refused.value.message
        await client.rcpt("user@local.example")
        with pytest.raises(aiosmtplib.SMTPResponseException) as big:
            await client.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 300)
        assert big.value.code == 552
        await client.rset()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as declared:
            await client.mail("alice@origin.example", options=["SIZE=50000"])
        assert declared.value.code == 552


@pytest.mark.parametrize("storage", ["disk", "journal"])
async def test_full_disk_answers_451_and_loses_nothing(
    small_fs: Path, daemon_factory: DaemonFactory, sink: Sink, storage: str
) -> None:
    daemon = await daemon_factory(
        {
            "routes": routes_to(sink, "dest.example"),
            "storage": {"type": storage, "path": str(small_fs / "q")},
        }
    )
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):  # fill the filesystem: the kernel's own ENOSPC follows
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    send = functools.partial(
        aiosmtplib.send, MESSAGE, sender="alice@origin.example",
        recipients=["bob@dest.example"], hostname="127.0.0.1", port=daemon.port, start_tls=False,
    )  # fmt: skip
    with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
        await send()
    assert failed.value.code == 451
    assert failed.value.message.startswith("4.3.0")
    assert "Errno" not in failed.value.message
    assert "space" not in failed.value.message
    filler.unlink()
    errors, _ = await send()
    assert errors == {}
    await until(lambda: len(sink.received) == 1, timeout=30)
    assert len(sink.received) == 1  # the refused message was not delivered


async def test_config_error_is_exit_2_without_traceback(daemon_factory: DaemonFactory) -> None:
    daemon = await daemon_factory({"storage": {"type": "tape"}}, start=False)
    code, out, err = await daemon.cli("serve")
    assert code == 2
    assert "storage.type must be one of" in err
    assert "Traceback" not in err + out


async def test_sigterm_exits_zero(daemon_factory: DaemonFactory, sink: Sink) -> None:
    daemon = await daemon_factory({"routes": routes_to(sink, "dest.example")})
    assert await daemon.stop(signal.SIGTERM) == 0
    assert "smtpq stopped" in daemon.logs()
