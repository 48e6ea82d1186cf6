"""The pure rules of scheduling per destination: limits, patterns, rates, windows, dead states."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpq.queue.destinations import (
    RATE_TOLERANCE,
    UNLIMITED,
    DeadMark,
    Destination,
    DestinationLimits,
    DestinationPolicy,
    Outcome,
    StartKind,
    State,
    Transition,
    format_rate,
    gcra,
    outcome_of,
    parse_rate,
    unreachable_reply,
)
from smtpq.relay.base import DEFAULT_DESTINATION, is_connection_failure, next_hop_name
from smtpq.relay.pool import reply_for_error
from smtpq.relay.session import ReplyError
from smtpq.reply import Reply, missing_recipient_reply, unexpected_error_reply

REFUSED = Reply("451", "4.4.1 No answer from host (connection refused)", "CONNECT")
GREYLISTED = Reply("451", "4.7.1 Greylisted", "RCPT TO", remote_host="mx.example.com")


# -- rates and limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("10/s", 10.0), ("30/min", 0.5), ("30 / m", 0.5), ("7200/h", 2.0), (2, 2.0), ("4", 4.0)],
)
def test_rates_are_read_per_second(text: str | float, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["0/s", "-1/s", "fast", "10/day", "nan/s", True])
def test_a_bad_rate_is_refused_with_a_reason(text: str | float) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_rates_are_shown_as_people_write_them() -> None:
    assert (format_rate(10.0), format_rate(0.5), format_rate(None)) == ("10/s", "30/min", "-")


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        DestinationLimits(concurrency=0)
    with pytest.raises(ValueError, match="cool_down"):
        DestinationLimits(cool_down=600, max_cool_down=300)
    with pytest.raises(ValueError, match="rates"):
        DestinationLimits(message_rate=0.0)
    assert DestinationLimits(concurrency=3).window == 3  # the initial window within the limit


def test_a_share_of_the_limits_per_worker_never_adds_up_to_more() -> None:
    limits = DestinationLimits(concurrency=5, message_rate=10.0, connection_rate=1.0)
    share = limits.share(2)
    assert (share.concurrency, share.message_rate, share.connection_rate) == (2, 5.0, 0.5)
    assert share.initial_window == 2
    assert DestinationLimits(concurrency=1).share(4).concurrency == 1  # each worker needs one
    assert limits.share(1) is limits


def test_patterns_exact_name_then_longest_glob_then_default() -> None:
    small, medium, large = (DestinationLimits(concurrency=n) for n in (1, 2, 3))
    policy = DestinationPolicy(
        patterns=(("*.example.net", small), ("*.mx.example.net", medium), ("Example.NET", large))
    )
    assert policy.limits_for("example.net") is large  # exact, whatever the case
    assert policy.limits_for("a.example.net") is small
    assert policy.limits_for("b.mx.example.net") is medium  # the longer glob wins
    assert policy.limits_for("example.org") is policy.default
    assert policy.limits_for("x.EXAMPLE.net") is small


def test_a_relay_that_names_no_destination_is_limited_only_by_the_pool() -> None:
    policy = DestinationPolicy(patterns=(("*", DestinationLimits(concurrency=2)),))
    assert policy.limits_for(DEFAULT_DESTINATION) is UNLIMITED
    assert policy.limits_for("example.com").concurrency == 2
    named = DestinationPolicy(patterns=((DEFAULT_DESTINATION, DestinationLimits(concurrency=7)),))
    assert named.limits_for(DEFAULT_DESTINATION).concurrency == 7


def test_next_hop_names() -> None:
    assert next_hop_name("smtp.example.net", 587) == "smtp.example.net:587"
    assert next_hop_name("::1", 25) == "[::1]:25"


# -- the rate algorithm ------------------------------------------------------------------------


def _starts(requests: list[float], interval: float) -> list[float]:
    tat, out = 0.0, []
    for at in requests:
        start, tat = gcra(tat, at, interval, interval * RATE_TOLERANCE)
        out.append(start)
    return out


@given(
    st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=60),
    st.floats(0.01, 5),
    st.floats(0, 30),
)
def test_a_rate_is_never_exceeded_in_any_window(
    times: list[float], interval: float, length: float
) -> None:
    starts = _starts(sorted(times), interval)
    assert all(s >= t for s, t in zip(starts, sorted(times), strict=True))
    tolerance = interval * RATE_TOLERANCE
    for begin in starts:
        inside = [s for s in starts if begin <= s <= begin + length]
        assert len(inside) <= math.floor((length + tolerance) / interval + 1e-9) + 1


@given(st.floats(0.01, 5), st.floats(0, 1000), st.integers(3, 40))
def test_a_backlog_is_served_at_exactly_the_rate(interval: float, t0: float, n: int) -> None:
    """Each waiter asks when the last one started: after the first, one start per interval."""
    tat, at, starts = 0.0, t0, []
    for _ in range(n):
        start, tat = gcra(tat, at, interval, interval * RATE_TOLERANCE)
        starts.append(start)
        at = start
    gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
    assert gaps == pytest.approx([interval] * len(gaps))


# -- what an attempt teaches -------------------------------------------------------------------


def test_connection_failures_are_those_before_any_transaction() -> None:
    refused = reply_for_error(ConnectionRefusedError(111, "refused"), host="h", command="CONNECT")
    silent = reply_for_error(TimeoutError(), host="h", command="CONNECT")
    busy = reply_for_error(ReplyError(Reply("421", "4.3.2 Busy")), host="h", command="CONNECT")
    dropped = reply_for_error(ConnectionResetError(), host="h", command="EHLO")
    lost_in_data = reply_for_error(ConnectionResetError(), host="h", command="DATA")
    assert all(map(is_connection_failure, (refused, silent, busy, dropped)))
    assert is_connection_failure(Reply("451", "4.4.3 Temporary DNS failure looking up x"))
    assert not is_connection_failure(lost_in_data)
    assert not is_connection_failure(GREYLISTED)
    assert not is_connection_failure(Reply("554", "5.7.1 No", "CONNECT"))


def test_the_outcome_of_an_attempt() -> None:
    assert outcome_of([None]) == (Outcome.SUCCESS, None)
    assert outcome_of([REFUSED, REFUSED]) == (Outcome.FAILURE, REFUSED)
    assert outcome_of([REFUSED, GREYLISTED]) == (Outcome.SUCCESS, None)  # the host answered
    assert outcome_of([Reply("550", "5.1.1 No such user", "RCPT TO")])[0] is Outcome.SUCCESS
    assert outcome_of([unexpected_error_reply(), missing_recipient_reply()])[0] is Outcome.NEUTRAL
    assert outcome_of([unexpected_error_reply(), REFUSED]) == (Outcome.FAILURE, REFUSED)


def test_the_deferral_reply_names_the_destination_and_the_last_error() -> None:
    reply = unreachable_reply("example.net", str(REFUSED))
    assert reply.is_transient()
    assert str(reply) == (
        "451 4.4.1 destination example.net unreachable: "
        "451 4.4.1 No answer from host (connection refused)"
    )


# -- one destination ---------------------------------------------------------------------------


def _start(d: Destination, now: float) -> bool:
    kind = d.start_kind(now)
    if kind in (StartKind.START, StartKind.PROBE):
        d.started(now, kind is StartKind.PROBE)
        return kind is StartKind.PROBE
    raise AssertionError(f"{d.name} cannot start: {kind}")


def test_the_window_starts_small_grows_with_successes_and_shrinks_on_failures() -> None:
    d = Destination("example.com", DestinationLimits(concurrency=7))
    for _ in range(5):
        _start(d, 0)
    assert d.start_kind(0) is None  # the initial window: 5
    for _ in range(5):  # a full window of successes: one more slot
        d.finished(Outcome.SUCCESS, None, 1, False)
    assert d.slots == 6
    for _ in range(100):
        _start(d, 2)
        d.finished(Outcome.SUCCESS, None, 2, False)
    assert d.slots == 7  # capped by the limit
    _start(d, 3)
    d.finished(Outcome.FAILURE, REFUSED, 3, False)
    assert (d.slots, d.failures) == (6, 1)
    _start(d, 4)
    d.finished(Outcome.SUCCESS, None, 4, False)  # any answer ends the run of failures
    assert d.failures == 0


def test_dead_after_failures_in_a_row_then_one_probe_per_cool_down() -> None:
    d = Destination("example.net", DestinationLimits(cool_down=300, max_cool_down=1000))
    for _ in range(5):
        _start(d, 0)
    changes = [d.finished(Outcome.FAILURE, REFUSED, 10, False) for _ in range(5)]
    assert changes == [None] * 4 + [Transition.DIED]
    assert (d.state, d.dead_until, d.last_error) == (State.DEAD, 310, str(REFUSED))
    assert d.start_kind(309) is StartKind.DEFER
    assert _start(d, 310)  # the probe
    assert d.start_kind(310) is None  # the others wait for it
    assert d.finished(Outcome.FAILURE, REFUSED, 320, True) is Transition.DIED
    assert d.dead_until == 320 + 600  # the cool-down doubled
    _start(d, 920)
    d.finished(Outcome.FAILURE, REFUSED, 920, True)
    assert d.dead_until == 920 + 1000  # at most max_cool_down
    _start(d, 1920)
    assert d.finished(Outcome.SUCCESS, None, 1921, True) is Transition.REVIVED
    assert (d.state, d.slots, d.cool_down) == (State.ACTIVE, 5, 300)


def test_a_message_level_4xx_never_kills_a_destination() -> None:
    d = Destination("example.com", DestinationLimits(dead_after=2))
    for _ in range(20):
        _start(d, 0)
        assert d.finished(*outcome_of([GREYLISTED]), 0, False) is None
    assert d.state is State.ACTIVE


def test_dead_after_zero_never_dies_and_neutral_outcomes_teach_nothing() -> None:
    d = Destination("x", DestinationLimits(dead_after=0))
    for _ in range(50):
        _start(d, 0)
        d.finished(Outcome.FAILURE, REFUSED, 0, False)
    assert d.state is State.ACTIVE
    assert d.slots == 1
    d.finished(Outcome.NEUTRAL, None, 0, False)
    assert d.slots == 1


def test_a_mark_learnt_from_another_worker() -> None:
    d = Destination("x", DestinationLimits())
    d.learn(DeadMark(500.0, "451 4.4.1 refused", 600.0), 100.0)
    assert (d.state, d.dead_until, d.cool_down, d.last_error) == (
        State.DEAD, 500.0, 600.0, "451 4.4.1 refused",
    )  # fmt: skip
    assert d.start_kind(499) is StartKind.DEFER
    d.learn(DeadMark(50.0, "", 300.0), 100.0)  # a cool-down that is over: probe here
    assert d.start_kind(501) is StartKind.PROBE


def test_the_recent_rate_counts_the_last_minute() -> None:
    d = Destination("x", DestinationLimits())
    for t in range(60):
        _start(d, t)
        d.finished(Outcome.SUCCESS, None, float(t), False)
    assert d.rate(59.0) == pytest.approx(1.0)
    assert d.rate(200.0) == 0.0


def _finish_many(d: Destination, n: int, start: float, end: float) -> None:
    """``n`` attempts finished one after the other, evenly from ``start`` to ``end``."""
    for i in range(n):
        t = start + (end - start) * i / max(1, n - 1)
        _start(d, t)
        d.finished(Outcome.SUCCESS, None, t, False)


def test_postponed_messages_come_back_when_the_destination_can_take_them() -> None:
    d = Destination("x", DestinationLimits())
    _finish_many(d, 200, 10.0, 12.0)  # 100 a second, counted over 2 s
    assert d.keeps_up(100, 12.0)
    assert not d.keeps_up(101, 12.0)
    first = [d.postpone_until(12.0, 120.0) for _ in range(3)]
    # A second, then one more per message already out, at the destination's rate.
    assert first == [pytest.approx(13.0), pytest.approx(13.01), pytest.approx(13.02)]
    assert d.postpone_until(14.0, 120.0) == pytest.approx(15.0)  # the others are back
    assert d.postponed == 4


def test_a_rate_counted_over_less_than_a_second_is_not_trusted() -> None:
    d = Destination("x", DestinationLimits())
    _finish_many(d, 3, 0.0, 0.02)  # a cold start: three quick results, nothing known yet
    assert {d.postpone_until(0.05, 120.0) for _ in range(50)} == {0.05 + 1.0}


def _killed(d: Destination, now: float) -> None:
    """``dead_after`` connection failures in a row at ``now``: dead."""
    for _ in range(d.limits.dead_after):
        _start(d, now)
        d.finished(Outcome.FAILURE, REFUSED, now, False)
    assert d.state is State.DEAD


def test_a_flush_ends_the_cool_down_and_the_next_attempt_probes() -> None:
    d = Destination("x", DestinationLimits(cool_down=300))
    assert not d.end_cool_down(10.0)  # active: nothing to end
    _killed(d, 10.0)
    assert d.start_kind(20.0) is StartKind.DEFER
    assert d.end_cool_down(20.0)
    assert not d.end_cool_down(20.0)  # once
    assert d.start_kind(20.0) is StartKind.PROBE
    assert _start(d, 20.0)
    d.finished(Outcome.FAILURE, REFUSED, 21.0, True)  # a failed probe still doubles it
    assert (d.state, d.dead_until) == (State.DEAD, 21.0 + 600)


def test_the_shared_store_ends_a_cool_down_only_when_it_says_less() -> None:
    d = Destination("x", DestinationLimits(cool_down=300))
    assert not d.reconcile(None, 10.0)  # active: nothing to end
    _killed(d, 10.0)
    until = d.dead_until
    assert not d.reconcile(DeadMark(until, "451 4.4.1 refused", 300.0), 20.0)  # the same
    assert not d.reconcile(DeadMark(until + 60, "451 4.4.1 refused", 600.0), 20.0)  # longer
    assert d.dead_until == until
    # Ended sooner (a flush through another worker), or no mark (another worker's probe
    # revived it): the next attempt here is the probe.
    assert d.reconcile(DeadMark(20.0, "451 4.4.1 refused", 300.0), 20.0)
    assert d.start_kind(20.0) is StartKind.PROBE
    e = Destination("y", DestinationLimits(cool_down=300))
    _killed(e, 10.0)
    assert e.reconcile(None, 30.0)
    assert (e.state, e.dead_until, e.start_kind(30.0)) == (State.DEAD, 30.0, StartKind.PROBE)
    assert not e.reconcile(None, 30.0)  # once


def test_mail_postponed_behind_a_probe_and_after_a_revival_comes_back_soon() -> None:
    d = Destination("x", DestinationLimits())
    _killed(d, 10.0)
    d.end_cool_down(12.0)
    assert _start(d, 12.0)  # the probe
    # Its failures say nothing of its rate: a second later, while the probe decides.
    assert d.postpone_until(12.5, 120.0) == 13.5
    d.finished(Outcome.SUCCESS, None, 12.6, True)
    assert d.state is State.ACTIVE
    assert d.postpone_until(12.7, 120.0) == pytest.approx(13.7)  # a fresh rate: not trusted yet


def test_a_destination_without_results_gets_its_messages_back_ever_more_spread() -> None:
    d = Destination("x", DestinationLimits(initial_window=5))
    assert not d.keeps_up(1, 0.0)
    # The first second: every one comes back a second later, the rate may be known by then.
    assert [d.postpone_until(0.0, 120.0), d.postpone_until(0.5, 120.0)] == [1.0, 1.5]
    # After 10 s without a result: at most 5 attempts per 10 s, so 2 s per message out.
    assert d.postpone_until(10.0, 120.0) == pytest.approx(11.0)
    assert d.postpone_until(10.0, 120.0) == pytest.approx(13.0)
    assert d.postpone_until(10.0, 120.0) == pytest.approx(15.0)
    many = [d.postpone_until(10.0, 30.0) for _ in range(20)]
    assert max(many) == 40.0  # within max_wait


@given(
    st.integers(1, 30),
    st.integers(1, 30),
    st.lists(st.sampled_from(["start", "success", "failure", "neutral", "wait"]), max_size=200),
)
def test_the_window_stays_within_its_bounds(concurrency: int, initial: int, ops: list[str]) -> None:
    d = Destination("x", DestinationLimits(concurrency=concurrency, initial_window=initial))
    now = 0.0
    running: list[bool] = []
    for op in ops:
        kind = d.start_kind(now)
        if op == "start" and kind in (StartKind.START, StartKind.PROBE):
            if kind is StartKind.START:
                assert d.in_flight < d.slots
            running.append(kind is StartKind.PROBE)
            d.started(now, kind is StartKind.PROBE)
        elif op in ("success", "failure", "neutral") and running:
            outcome = {"success": Outcome.SUCCESS, "failure": Outcome.FAILURE}.get(op)
            d.finished(outcome or Outcome.NEUTRAL, REFUSED, now, running.pop(0))
        elif op == "wait":
            now += 100.0
        assert 1 <= d.window <= concurrency
        assert 0 <= d.in_flight <= concurrency
