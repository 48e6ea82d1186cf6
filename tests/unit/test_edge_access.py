"""The relay rule: pure."""

from __future__ import annotations

import pytest

from smtpq.edge.access import RelayPolicy

POLICY = RelayPolicy(["Example.org.", ".corp.example"], ["192.0.2.0/24", "2001:db8::/32"])


@pytest.mark.parametrize(
    ("recipient", "ip", "authenticated", "allowed"),
    [
        ("a@example.org", "203.0.113.9", False, True),
        ("a@EXAMPLE.ORG", None, False, True),
        ("a@sub.example.org", "203.0.113.9", False, False),
        ("a@mail.corp.example", "203.0.113.9", False, True),
        ("a@corp.example", "203.0.113.9", False, False),
        ("a@evil.example", "203.0.113.9", False, False),
        ("a@example.org.evil.example", "203.0.113.9", False, False),
        ("postmaster", "203.0.113.9", False, False),
        ("a@evil.example", "192.0.2.77", False, True),
        ("a@evil.example", "::ffff:192.0.2.77", False, True),
        ("a@evil.example", "2001:db8::1", False, True),
        ("a@evil.example", "fe80::1%eth0", False, False),
        ("a@evil.example", "not an ip", False, False),
        ("a@evil.example", "203.0.113.9", True, True),
    ],
)
def test_relay_rule(recipient: str, ip: str | None, authenticated: bool, allowed: bool) -> None:
    assert POLICY.allows(recipient, ip, authenticated) is allowed


def test_no_rules_no_relay() -> None:
    assert not RelayPolicy().allows("a@example.org", "127.0.0.1", False)
