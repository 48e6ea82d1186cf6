"""The edge's pure limits: the per-client table (anvil), the minimum DATA rate, the recipient
rules (map, untrusted routing, <postmaster>), the allocator setting. Times are plain numbers:
no loop, no sleep."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

from smtpq.edge._malloc import map_large_blocks_apart
from smtpq.edge.access import RelayDecision, RelayPolicy
from smtpq.edge.limits import ClientTable, ConnectionLimits, ConnectionRefusal, content_deadline
from smtpq.edge.recipients import RecipientMap, RecipientRules, Verdict
from smtpq.reply import Replies, unknown_recipient_reply

LIMITS = ConnectionLimits(total=5, per_client=2, rate=0)


def test_defaults_are_postfix_s() -> None:
    assert ConnectionLimits() == ConnectionLimits(total=1000, per_client=50, rate=0)


def test_per_client_limit_and_release() -> None:
    table = ClientTable()
    assert table.admit("192.0.2.1", 0.0, LIMITS) is None
    assert table.admit("192.0.2.1", 0.0, LIMITS) is None
    assert table.admit("192.0.2.1", 0.0, LIMITS) is ConnectionRefusal.CLIENT_CONNECTIONS
    assert table.admit("192.0.2.2", 0.0, LIMITS) is None  # another client is served
    assert (table.open("192.0.2.1"), table.total) == (2, 3)
    table.release("192.0.2.1")
    assert table.admit("192.0.2.1", 1.0, LIMITS) is None
    table.release("203.0.113.9")  # never admitted: nothing to release
    assert table.total == 3


def test_total_limit_holds_for_exempt_clients_too() -> None:
    table = ClientTable()
    for _ in range(5):
        assert table.admit("127.0.0.1", 0.0, LIMITS, exempt=True) is None
    assert table.admit("127.0.0.1", 0.0, LIMITS, exempt=True) is ConnectionRefusal.CONNECTIONS
    assert table.admit("192.0.2.1", 0.0, LIMITS) is ConnectionRefusal.CONNECTIONS
    assert table.open("127.0.0.1") == 5  # beyond per_client: trusted networks are exempt


def test_rate_per_minute_counts_refused_attempts() -> None:
    limits = ConnectionLimits(total=0, per_client=0, rate=3)
    table = ClientTable()
    results = [table.admit("192.0.2.1", t, limits) for t in (0.0, 1.0, 2.0, 3.0)]
    assert results == [None, None, None, ConnectionRefusal.CLIENT_RATE]
    for _ in range(3):
        table.release("192.0.2.1")
    # Still hammering within the minute: still refused, each attempt counting.
    assert table.admit("192.0.2.1", 59.0, limits) is ConnectionRefusal.CLIENT_RATE
    assert table.admit("192.0.2.1", 60.5, limits) is None  # a new minute
    unlimited = ConnectionLimits(total=0, per_client=0, rate=0)
    assert all(table.admit("192.0.2.9", 0.0, unlimited) is None for _ in range(500))


def test_refusals_are_logged_once_a_minute_per_client() -> None:
    table = ClientTable()
    assert table.should_log("192.0.2.1", 100.0)
    assert not table.should_log("192.0.2.1", 101.0)
    assert table.should_log("192.0.2.2", 101.0)
    assert table.should_log("", 101.0)  # the total limit has its own line
    assert not table.should_log("192.0.2.1", 159.0)
    assert table.should_log("192.0.2.1", 160.0)


def test_the_table_forgets_idle_clients() -> None:
    table = ClientTable()
    for n in range(1000):
        ip = f"10.0.{n // 250}.{n % 250}"
        table.admit(ip, 0.0, LIMITS)
        table.release(ip)
    table.admit("192.0.2.1", 1.0, LIMITS)  # still open when the sweep comes
    table.admit("192.0.2.2", 120.0, LIMITS)
    assert len(table) == 2


def test_a_steady_slow_link_never_runs_out_of_time() -> None:
    """25 MiB at 2 KiB/s (four times the minimum) takes 3.5 hours and completes."""
    timeout, rate = 300.0, 500
    now = 0.0
    deadline = now + timeout
    sent = 0
    while sent < 25 * 1024 * 1024:
        now += 1.0
        assert now < deadline
        deadline = content_deadline(deadline, now, 2048, timeout, rate)
        sent += 2048
    assert deadline == now + timeout  # never more credit than the per-read timeout


def test_a_trickle_runs_out_of_time() -> None:
    """One byte every 20 s: cut off after about the timeout, however long it keeps going."""
    timeout, rate = 300.0, 500
    now = 0.0
    deadline = now + timeout
    while now < deadline:
        now += 20.0
        if now < deadline:
            deadline = content_deadline(deadline, now, 1, timeout, rate)
    assert 300.0 <= now <= 320.0
    # Without a minimum rate, only silence counts.
    assert content_deadline(10.0, 100.0, 1, timeout, 0) == 400.0


def test_burst_then_silence_is_the_per_read_timeout() -> None:
    deadline = content_deadline(300.0, 1.0, 10 * 1024 * 1024, 300.0, 500)
    assert deadline == 301.0


# -- the recipient map ------------------------------------------------------------------------


def test_recipient_map(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "recipients"
    path.write_text(
        "# known recipients\n"
        "Alice@Example.org   OK\n"
        "@catchall.example\n"
        "not-an-address\n"
        "bob@example.org # the sales desk\n"
        "\n"
    )
    known = RecipientMap.load(path)
    assert len(known) == 3
    assert "alice@example.org" in known
    assert "ALICE@EXAMPLE.ORG" in known
    assert "bob@example.org" in known
    assert "anyone@catchall.example" in known
    assert "carol@example.org" not in known
    assert "postmaster" not in known
    assert "recipients:4: not an address" in caplog.text
    with pytest.raises(FileNotFoundError):
        RecipientMap.load(tmp_path / "missing")


# -- untrusted routing ------------------------------------------------------------------------

POLICY = RelayPolicy(["example.org"], ["192.0.2.0/24"])


@pytest.mark.parametrize(
    ("recipient", "decision"),
    [
        ("user@example.org", RelayDecision.ALLOWED),
        ("user%elsewhere.example@example.org", RelayDecision.ROUTED),
        ("elsewhere.example!user@example.org", RelayDecision.ROUTED),
        ('"user@elsewhere.example"@example.org', RelayDecision.ROUTED),
        ("user@elsewhere.example", RelayDecision.DENIED),
        ("user%example.org@elsewhere.example", RelayDecision.DENIED),
    ],
)
def test_untrusted_routing(recipient: str, decision: RelayDecision) -> None:
    assert POLICY.decide(recipient, "203.0.113.9", False) is decision
    # Trusted and authenticated clients may route (they may relay anywhere anyway).
    assert POLICY.decide(recipient, "192.0.2.7", False) is RelayDecision.ALLOWED
    assert POLICY.decide(recipient, "203.0.113.9", True) is RelayDecision.ALLOWED
    allowing = RelayPolicy(["example.org"], allow_untrusted_routing=True)
    denied = decision is RelayDecision.DENIED
    assert allowing.allows(recipient, "203.0.113.9", False) is not denied


def test_recipient_rules() -> None:
    known = RecipientMap(frozenset({"alice@example.org"}))
    rules = RecipientRules(POLICY, known, "hostmaster@example.org")
    untrusted, trusted = "203.0.113.9", "192.0.2.7"
    assert rules.check("PostMaster", untrusted, False) == Verdict("hostmaster@example.org")
    assert rules.check("root", trusted, False) == Verdict("root", Replies.NO_DOMAIN)
    assert rules.check("alice@example.org", untrusted, False) == Verdict("alice@example.org")
    assert rules.check("bob@example.org", trusted, True) == Verdict(
        "bob@example.org", unknown_recipient_reply("bob@example.org"), "unknown_recipient"
    )
    assert rules.check("x@elsewhere.example", untrusted, False).reason == "relay_denied"
    assert rules.check("a%b@example.org", untrusted, False).reason == "untrusted_routing"
    # The map is about the relay domains only: a trusted client relays elsewhere freely.
    assert rules.check("x@elsewhere.example", trusted, False) == Verdict("x@elsewhere.example")
    anyone = RecipientRules(POLICY, None, "p@x")
    assert anyone.check("bob@example.org", untrusted, False).refusal is None


def test_large_blocks_get_mappings_of_their_own_on_glibc() -> None:
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert map_large_blocks_apart() is glibc
    assert map_large_blocks_apart() is glibc  # once per process; again is harmless
