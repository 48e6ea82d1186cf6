"""The pure outcome and retry rules: no loop, no clock, no I/O."""

from __future__ import annotations

from smtpq.queue.rules import (
    delay_warning_due,
    exhausted_reply,
    group_by_reply,
    is_expired,
    judge,
)
from smtpq.relay.base import PermanentRelayError, TransientRelayError
from smtpq.reply import Reply

RCPTS = ["a@x", "b@x", "c@x", "d@x"]
IDX = (0, 2, 5, 7)  # original indexes of the pending recipients


def test_none_means_all_delivered() -> None:
    j = judge(RCPTS, IDX, None)
    assert j.delivered == IDX
    assert j.permanent == j.transient == ()


def test_whole_message_reply_by_code() -> None:
    assert judge(RCPTS, IDX, Reply("250", "ok")).delivered == IDX
    j = judge(RCPTS, IDX, Reply("451", "later"))
    assert j.transient_indexes == IDX
    assert j.last_reply == Reply("451", "later")
    j = judge(RCPTS, IDX, Reply("554", "no"))
    assert j.permanent == ((Reply("554", "no"), IDX),)


def test_relay_errors_by_class() -> None:
    j = judge(RCPTS, IDX, PermanentRelayError("no"))
    assert j.permanent[0][0].code == "550"
    j = judge(RCPTS, IDX, TransientRelayError("later", Reply("421", "4.4.2 dropped")))
    assert j.transient == ((Reply("421", "4.4.2 dropped"), IDX),)


def test_unexpected_exception_is_transient_450() -> None:
    j = judge(RCPTS, IDX, RuntimeError("bug"))
    assert j.transient_indexes == IDX
    assert j.last_reply is not None
    assert str(j.last_reply).startswith("450 4.0.0")


def test_per_recipient_results_and_missing() -> None:
    result = {
        "a@x": None,
        "b@x": Reply("550", "5.1.1 unknown"),
        "c@x": TransientRelayError("busy", Reply("452", "4.2.2 full")),
    }
    j = judge(RCPTS, IDX, result)  # d@x missing
    assert j.delivered == (0,)
    assert j.permanent == ((Reply("550", "5.1.1 unknown"), (2,)),)
    assert j.transient[0] == (Reply("452", "4.2.2 full"), (5,))
    assert j.transient[1][1] == (7,)
    assert j.transient[1][0].code == "450"


def test_non_error_non_success_reply_is_transient() -> None:
    j = judge(["a@x"], (0,), Reply("354", "go on"))
    assert j.transient_indexes == (0,)


def test_one_group_per_distinct_reply() -> None:
    r1, r2 = Reply("550", "5.1.1 a"), Reply("550", "5.7.1 b")
    groups = group_by_reply([(0, r1), (1, r2), (2, Reply("550", "5.1.1 a"))])
    assert groups == ((r1, (0, 2)), (r2, (1,)))


def test_exhausted_reply_keeps_status_or_marks_expiry() -> None:
    last = Reply("451", "4.7.1 greylisted", remote_host="mx")
    reply, why = exhausted_reply(last, 6, expired=False)
    assert reply.enhanced_status_code == "4.7.1"
    assert "retries exhausted after 6 attempts" in why
    reply, why = exhausted_reply(last, 30, expired=True)
    assert reply.enhanced_status_code == "4.4.7"
    assert reply.remote_host == "mx"
    assert "expired" in why
    assert last.enhanced_status_code == "4.7.1"  # not changed in place


def test_is_expired() -> None:
    assert is_expired(100.0, 1000.0, 1100.0)
    assert not is_expired(100.0, 1000.0, 1099.0)
    assert not is_expired(None, 1000.0, 10**9)
    assert not is_expired(100.0, None, 10**9)


def test_delay_warning_due_once_per_threshold() -> None:
    hours = [4 * 3600.0, 24 * 3600.0]
    received = 1000.0
    # An attempt scheduled 3 h after arrival that failed at 3.5 h: nothing yet.
    assert delay_warning_due(hours, received, received + 3 * 3600, received + 3.5 * 3600) is None
    # Scheduled at 3.9 h, failed at 4.1 h: the 4-hour warning.
    assert (
        delay_warning_due(hours, received, received + 3.9 * 3600, received + 4.1 * 3600) == 4 * 3600
    )
    # The next attempt (scheduled after 4 h) does not warn again.
    assert delay_warning_due(hours, received, received + 4.1 * 3600, received + 6 * 3600) is None
    # Both thresholds crossed by one long gap: one warning, for the later.
    assert delay_warning_due(hours, received, received, received + 30 * 3600) == 24 * 3600
    assert delay_warning_due([], received, received, received + 10**6) is None
    assert delay_warning_due(hours, None, 0.0, 10**9) is None
