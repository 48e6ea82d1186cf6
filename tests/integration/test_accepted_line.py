"""The ``accepted`` log line: queue id, recipients, sender, client address and Message-ID, so
that a sender's Message-ID leads to the queue id (Postfix's ``cleanup: message-id=``)."""

from __future__ import annotations

import logging

import pytest

from smtpq import AddMissingHeaders, DictStorage, Envelope, ManualClock, Queue


async def accepted_line(message: bytes, caplog: pytest.LogCaptureFixture, **client: str) -> str:
    """Enqueue ``message`` (from a client with these fields) and return its accepted line."""
    env = Envelope("alice@origin.example", ["bob@dest.example"])
    env.parse(message)
    env.client = dict(client)
    queue = Queue(
        DictStorage(), None, clock=ManualClock(), hostname="mx.test",
        policies=[AddMissingHeaders("mx.test")],
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="smtpq.queue")
    caplog.clear()
    [(_, id)] = await queue.enqueue(env)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("accepted ")]
    prefix = f"accepted id={id} to=<bob@dest.example> sender=<alice@origin.example> "
    assert line.startswith(prefix)
    return line[len(prefix) : line.index(" seconds=")]


async def test_client_address_and_message_id(caplog: pytest.LogCaptureFixture) -> None:
    message = b"Subject: hi\r\nMessage-ID: <abc.123@origin.example>\r\n\r\nbody\r\n"
    origin = await accepted_line(message, caplog, ip="192.0.2.1", host="mail.origin.example")
    assert origin == "client=[192.0.2.1] message-id=<abc.123@origin.example>"


async def test_a_folded_or_oddly_cased_message_id(caplog: pytest.LogCaptureFixture) -> None:
    message = b"Subject: hi\r\nmessage-id:\r\n  <folded@origin.example> (comment)\r\n\r\nbody\r\n"
    origin = await accepted_line(message, caplog, ip="2001:db8::1")
    assert origin == "client=[2001:db8::1] message-id=<folded@origin.example>"


async def test_the_message_id_the_queue_added(caplog: pytest.LogCaptureFixture) -> None:
    # No Message-ID from the client: the one AddMissingHeaders adds is the one logged.
    origin = await accepted_line(b"Subject: hi\r\n\r\nbody\r\n", caplog, ip="192.0.2.1")
    assert origin.startswith("client=[192.0.2.1] message-id=<")
    assert origin.endswith("@mx.test>")


async def test_no_client_for_a_message_enqueued_by_a_program(
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = b"Message-ID: <local@origin.example>\r\n\r\nbody\r\n"
    assert await accepted_line(message, caplog) == "message-id=<local@origin.example>"


async def test_a_hostile_message_id_stays_one_short_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long = b"<" + b"x" * 5000 + b"@origin.example>"
    message = b"Message-ID: " + long + b"\r\n\r\nbody\r\n"
    origin = await accepted_line(message, caplog, ip="192.0.2.1")
    assert origin == "client=[192.0.2.1] message-id=<" + "x" * 249
    # Control characters and bytes that are not ASCII do not reach the log.
    message = b"Message-ID: <a\x1b[31m\xffb@origin.example> injected=1\r\n\r\nbody\r\n"
    origin = await accepted_line(message, caplog, ip="192.0.2.1")
    assert origin == "client=[192.0.2.1] message-id=<a[31mb@origin.example>"


async def test_only_a_message_id_field_of_its_own_is_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The name inside another field's name or value is no Message-ID field.
    message = (
        b"X-Message-ID: <not@this.example>\r\nSubject: message-id: <nor@this.example>\r\n"
        b"MESSAGE-ID: <this@origin.example>\r\n\r\nbody\r\n"
    )
    assert await accepted_line(message, caplog) == "message-id=<this@origin.example>"
