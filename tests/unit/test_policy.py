"""Queue policies."""

from __future__ import annotations

from smtpq.envelope import Envelope
from smtpq.policy import AddMissingHeaders, AddReceivedHeader, RecipientDomainSplit, RecipientSplit


def _env(rcpts: list[str]) -> Envelope:
    env = Envelope("s@example.org", rcpts)
    env.parse(b"Subject: hi\r\n\r\nbody\r\n")
    env.timestamp = 1_800_000_000.0
    return env


def test_recipient_split() -> None:
    out = RecipientSplit().apply(_env(["a@x", "b@y"]))
    assert out is not None
    assert [e.recipients for e in out] == [["a@x"], ["b@y"]]
    assert RecipientSplit().apply(_env(["a@x"])) is None


def test_domain_split_groups_case_insensitively() -> None:
    out = RecipientDomainSplit().apply(_env(["a@X.org", "b@y.org", "c@x.ORG"]))
    assert out is not None
    assert [e.recipients for e in out] == [["a@X.org", "c@x.ORG"], ["b@y.org"]]


def test_received_header_from_client_details() -> None:
    env = _env(["a@x"])
    env.client = {"ip": "192.0.2.7", "host": "client.example", "name": "helo.example",
                  "protocol": "ESMTPS"}  # fmt: skip
    env.receiver = "mx.example.org"
    AddReceivedHeader().apply(env)
    received = " ".join(env.headers["Received"].split())
    assert received == (
        "from helo.example (client.example [192.0.2.7]) by mx.example.org (smtpq) "
        "with ESMTPS for <a@x>; Fri, 15 Jan 2027 08:00:00 +0000"
    )
    assert env.flatten()[0].endswith(b"Subject: hi\r\n\r\n")


def test_received_header_resists_injection() -> None:
    env = _env(["a@x"])
    env.client = {"ip": "192.0.2.7", "name": "evil\r\nBcc: victim@example.com"}
    AddReceivedHeader("mx").apply(env)
    assert env.headers["Bcc"] is None


def test_missing_headers_added_once() -> None:
    env = _env(["a@x"])
    policy = AddMissingHeaders("mx.example.org")
    policy.apply(env)
    policy.apply(env)
    assert env.headers.get_all("Date") == ["Fri, 15 Jan 2027 08:00:00 +0000"]
    ids = env.headers.get_all("Message-ID")
    assert ids is not None
    assert len(ids) == 1
    assert ids[0].endswith("@mx.example.org>")
    assert env.flatten()[1] == b"body\r\n"
