"""The pure outcome and retry rules: no loop, no clock, no I/O."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpq.backoff import DefaultBackoff
from smtpq.clock import ManualClock
from smtpq.envelope import Envelope
from smtpq.notice import Action
from smtpq.queue.event import EventKind
from smtpq.queue.rules import (
    Attempt,
    MarkDone,
    Remove,
    Reschedule,
    RetryRules,
    SendNotice,
    Step,
    Verdict,
    delay_warning_due,
    is_expired,
    judge,
    may_postpone,
    next_attempt_time,
    plan,
    postpone,
    record_delivered,
)
from smtpq.relay.base import PermanentRelayError, TransientRelayError
from smtpq.reply import Reply

RCPTS = ["a@x", "b@x", "c@x", "d@x"]
IDX = (0, 2, 5, 7)  # original indexes of the pending recipients
T0 = 1_800_000_000.0
HOUR = 3600.0


def indexes(verdicts: tuple[Verdict, ...]) -> tuple[int, ...]:
    return tuple(v.index for v in verdicts)


def test_none_means_all_delivered() -> None:
    j = judge(RCPTS, IDX, None)
    assert indexes(j.delivered) == IDX
    assert j.permanent == j.transient == ()
    assert all(v.reply is None for v in j.delivered)


def test_whole_message_reply_by_code() -> None:
    assert indexes(judge(RCPTS, IDX, Reply("250", "ok")).delivered) == IDX
    j = judge(RCPTS, IDX, Reply("451", "later"))
    assert indexes(j.transient) == IDX
    assert j.last_reply == Reply("451", "later")
    j = judge(RCPTS, IDX, Reply("554", "no"))
    assert [(v.recipient, v.reply) for v in j.permanent] == [(r, Reply("554", "no")) for r in RCPTS]


def test_relay_errors_by_class() -> None:
    j = judge(RCPTS, IDX, PermanentRelayError("no"))
    assert j.permanent[0].reply is not None
    assert j.permanent[0].reply.code == "550"
    j = judge(RCPTS, IDX, TransientRelayError("later", Reply("421", "4.4.2 dropped")))
    assert {v.reply for v in j.transient} == {Reply("421", "4.4.2 dropped")}


def test_unexpected_exception_is_transient_450() -> None:
    j = judge(RCPTS, IDX, RuntimeError("bug"))
    assert indexes(j.transient) == IDX
    assert str(j.last_reply).startswith("450 4.0.0")


def test_per_recipient_results_each_keep_their_reply() -> None:
    result = {
        "a@x": None,
        "b@x": Reply("550", "5.1.1 b unknown"),
        "c@x": TransientRelayError("busy", Reply("452", "4.2.2 full")),
    }
    j = judge(RCPTS, IDX, result)  # d@x missing
    assert j.delivered == (Verdict(0, "a@x", None),)
    assert j.permanent == (Verdict(2, "b@x", Reply("550", "5.1.1 b unknown")),)
    assert j.transient[0] == Verdict(5, "c@x", Reply("452", "4.2.2 full"))
    assert j.transient[1].index == 7
    assert j.transient[1].reply is not None
    assert j.transient[1].reply.code == "450"


def test_failures_are_not_grouped_by_reply_text() -> None:
    result = {r: Reply("550", f"5.1.1 <{r}>: unknown") for r in RCPTS}
    j = judge(RCPTS, IDX, result)
    assert [v.reply for v in j.permanent] == [result[r] for r in RCPTS]


def test_non_error_non_success_reply_is_transient() -> None:
    j = judge(["a@x"], (0,), Reply("354", "go on"))
    assert indexes(j.transient) == (0,)


def test_is_expired() -> None:
    assert is_expired(100.0, 1000.0, 1100.0)
    assert not is_expired(100.0, 1000.0, 1099.0)
    assert not is_expired(None, 1000.0, 10**9)
    assert not is_expired(100.0, None, 10**9)


def test_delay_warning_due_in_the_attempts_window() -> None:
    hours = [4 * HOUR, 24 * HOUR]
    # An attempt due 3 h after arrival that failed at 3.5 h: nothing yet.
    assert delay_warning_due(hours, T0, T0 + 3 * HOUR, T0 + 3.5 * HOUR) is None
    # Due at 3.9 h, failed at 4.1 h; or due exactly at the threshold: the 4-hour warning.
    assert delay_warning_due(hours, T0, T0 + 3.9 * HOUR, T0 + 4.1 * HOUR) == 4 * HOUR
    assert delay_warning_due(hours, T0, T0 + 4 * HOUR, T0 + 4 * HOUR) == 4 * HOUR
    # The next attempt (due after 4 h) does not warn again.
    assert delay_warning_due(hours, T0, T0 + 4.1 * HOUR, T0 + 6 * HOUR) is None
    # Both thresholds passed in one window (the queue was down): one warning, the later.
    assert delay_warning_due(hours, T0, T0, T0 + 30 * HOUR) == 24 * HOUR
    assert delay_warning_due([], T0, T0, T0 + 10**6) is None
    assert delay_warning_due(hours, None, 0.0, 10**9) is None


def test_next_attempt_wakes_at_the_threshold_and_the_end_of_the_lifetime() -> None:
    rules = RetryRules((4 * HOUR,), lifetime=5 * 86400)
    # The backoff says 2.6 h after a failure at 2.6 h: the message wakes at 4 h instead.
    assert next_attempt_time(rules, T0, T0 + 2.6 * HOUR, 2.6 * HOUR) == T0 + 4 * HOUR
    assert next_attempt_time(rules, T0, T0 + HOUR, 600) == T0 + HOUR + 600
    # Past the threshold, the backoff's time; a last attempt when the lifetime ends.
    assert next_attempt_time(rules, T0, T0 + 5 * HOUR, 4 * HOUR) == T0 + 9 * HOUR
    assert next_attempt_time(rules, T0, T0 + 119.5 * HOUR, 4 * HOUR) == T0 + 120 * HOUR
    # Always strictly after the failure, even for a backoff that says 0.
    assert next_attempt_time(rules, T0, T0 + 4 * HOUR, 0) > T0 + 4 * HOUR


def test_retry_rules_validate() -> None:
    assert RetryRules((7200, 3600, 3600)).delay_warnings == (3600.0, 7200.0)
    for bad in ({"delay_warnings": (0,)}, {"lifetime": 0}, {"delay_warnings": (float("inf"),)}):
        try:
            RetryRules(**bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


# -- the plan --------------------------------------------------------------------------------

OK = Reply("250", "2.0.0 Ok", "DATA", remote_host="mx1", remote_ip="192.0.2.1", remote_dsn=False)
NO = Reply("550", "5.1.1 unknown", "RCPT TO", remote_host="mx1", remote_ip="192.0.2.1")
LATER = Reply("451", "4.7.1 greylisted", "RCPT TO", remote_host="mx1", remote_ip="192.0.2.1")


def attempt(rcpts: list[str], *, attempts: int = 0, scheduled: float = T0) -> Attempt:
    env = Envelope("s@example.org", rcpts)
    env.parse(b"Subject: t\r\n\r\nbody\r\n")
    env.timestamp = T0
    return Attempt("q1", env, attempts, tuple(range(len(rcpts))), scheduled)


def kinds(steps: list[Step]) -> list[str]:
    return [type(s).__name__ for s in steps]


def notices(steps: list[Step]) -> list[SendNotice]:
    return [s for s in steps if isinstance(s, SendNotice)]


def test_all_delivered_is_recorded_by_the_removal() -> None:
    a = attempt(["a@x", "b@x"])
    steps = plan(
        judge(a.envelope.recipients, a.pending, {"a@x": OK, "b@x": OK}), a, None, RetryRules(), T0
    )
    assert kinds(steps) == ["Remove"]
    assert [(e.kind, e.recipients) for e in steps[0].events] == [
        (EventKind.DELIVERED, ("a@x", "b@x")),
        (EventKind.REMOVED, ()),
    ]


def test_delivered_first_then_one_dsn_then_bounced_then_retry() -> None:
    a = attempt(["a@x", "b@x", "c@x", "d@x"])
    result = {"a@x": OK, "b@x": NO, "c@x": LATER, "d@x": NO.replace(message="5.2.2 full")}
    steps = plan(judge(a.envelope.recipients, a.pending, result), a, 300.0, RetryRules(), T0 + 5)
    assert kinds(steps) == ["MarkDone", "SendNotice", "MarkDone", "CountAttempt", "Reschedule"]
    done, dsn, bounced, _, again = steps
    assert isinstance(done, MarkDone)
    assert done.indexes == (0,)
    assert isinstance(dsn, SendNotice)
    assert dsn.notice.action is Action.FAILED
    assert dsn.notice.recipients == ["b@x", "d@x"]  # one DSN, each with its own reply
    assert [o.reply for o in dsn.notice.outcomes] == [NO, NO.replace(message="5.2.2 full")]
    assert isinstance(bounced, MarkDone)
    assert bounced.indexes == (1, 3)
    assert isinstance(again, Reschedule)
    assert again.at == T0 + 305
    assert again.last_reply == LATER
    [deferred] = again.events
    assert deferred.recipients == ("c@x",)
    assert deferred.detail["attempts"] == 1


def test_giving_up_joins_the_events_dsn_and_marks_expiry() -> None:
    a = attempt(["a@x", "b@x"], attempts=36, scheduled=T0 + 5 * 86400)
    result = {"a@x": NO, "b@x": LATER}
    rules = RetryRules(lifetime=5 * 86400)
    steps = plan(judge(a.envelope.recipients, a.pending, result), a, None, rules, T0 + 5 * 86400)
    assert kinds(steps) == ["SendNotice", "Remove"]
    [dsn] = notices(steps)
    assert dsn.notice.attempts == 37
    a_out, b_out = dsn.notice.outcomes
    assert (a_out.gave_up, b_out.gave_up, b_out.expired) == (False, True, True)
    assert dsn.notice.status(a_out) == "5.1.1"
    assert dsn.notice.status(b_out) == "4.4.7"
    assert [e.kind for e in dsn.events] == [EventKind.EXPIRED, EventKind.BOUNCED, EventKind.BOUNCED]
    assert [e.recipients for e in dsn.events] == [("b@x",), ("a@x",), ("b@x",)]
    # The backoff giving up before the lifetime: retries exhausted, the last reply's status.
    steps = plan(judge(["b@x"], (0,), LATER), attempt(["b@x"]), None, rules, T0 + 7200)
    [dsn] = notices(steps)
    assert not dsn.notice.outcomes[0].expired
    assert dsn.notice.status(dsn.notice.outcomes[0]) == "4.7.1"
    assert dsn.events[0].kind is EventKind.FAILED


def test_no_dsn_for_notify_never_or_the_null_sender() -> None:
    a = attempt(["a@x", "b@x"])
    a.envelope.rcpt_params["a@x"] = {"NOTIFY": "NEVER"}
    steps = plan(judge(a.envelope.recipients, a.pending, NO), a, None, RetryRules(), T0)
    [dsn] = notices(steps)
    assert dsn.notice.recipients == ["b@x"]
    assert isinstance(steps[-1], Remove)
    [silent] = [e for e in steps[-1].events if e.detail.get("dsn") == "none"]
    assert silent.recipients == ("a@x",)
    assert silent.kind is EventKind.BOUNCED
    a.envelope.sender = ""
    assert (
        notices(plan(judge(a.envelope.recipients, a.pending, NO), a, None, RetryRules(), T0)) == []
    )


def test_notify_success_gets_a_relayed_dsn_unless_the_next_hop_has_dsn() -> None:
    a = attempt(["a@x", "b@x", "c@x"])
    for rcpt in a.envelope.recipients:
        a.envelope.rcpt_params[rcpt] = {"NOTIFY": "SUCCESS"}
    result = {"a@x": OK, "b@x": OK.replace(remote_dsn=True), "c@x": None}
    steps = plan(judge(a.envelope.recipients, a.pending, result), a, None, RetryRules(), T0)
    assert kinds(steps) == ["MarkDone", "SendNotice", "Remove"]
    [dsn] = notices(steps)
    # b's next hop took the DSN parameters on; c's relay said nothing (not SMTP): relayed.
    assert dsn.notice.action is Action.RELAYED
    assert dsn.notice.recipients == ["a@x", "c@x"]
    assert {e.kind for e in dsn.events} == {EventKind.SUCCESS_NOTIFIED}


def test_delay_warning_is_sent_before_rescheduling_and_honours_notify() -> None:
    a = attempt(["a@x", "b@x", "c@x"], attempts=6, scheduled=T0 + 4 * HOUR)
    a.envelope.rcpt_params["b@x"] = {"NOTIFY": "FAILURE"}
    a.envelope.rcpt_params["c@x"] = {"NOTIFY": "DELAY"}
    rules = RetryRules((4 * HOUR,), lifetime=5 * 86400)
    j = judge(a.envelope.recipients, a.pending, LATER)
    steps = plan(j, a, 4 * HOUR, rules, T0 + 4 * HOUR + 2)
    assert kinds(steps) == ["CountAttempt", "SendNotice", "Reschedule"]
    [warning] = notices(steps)
    assert warning.notice.action is Action.DELAYED
    assert warning.notice.recipients == ["a@x", "c@x"]
    assert warning.notice.retry_until == T0 + 5 * 86400
    assert warning.notice.delayed_for == 4 * HOUR
    assert [e.recipients for e in warning.events] == [("a@x", "c@x")]
    # The attempt after it does not warn again.
    later = attempt(["a@x"], attempts=7, scheduled=T0 + 8 * HOUR)
    assert notices(plan(judge(["a@x"], (0,), LATER), later, 4 * HOUR, rules, T0 + 8 * HOUR)) == []


def test_nothing_pending_is_removed() -> None:
    a = attempt([])
    assert kinds(plan(judge([], (), None), a, None, RetryRules(), T0)) == ["Remove"]


_reply = st.sampled_from([OK, OK.replace(remote_dsn=True), NO, LATER, None])
_notify = st.sampled_from([None, "NEVER", "SUCCESS", "FAILURE", "DELAY", "SUCCESS,FAILURE,DELAY"])


@given(
    st.lists(st.tuples(_reply, _notify), min_size=0, max_size=6),
    st.one_of(st.none(), st.floats(0, 10 * 86400)),
    st.floats(0, 6 * 86400),
    st.booleans(),
)
def test_every_plan_keeps_the_order_that_loses_nothing(
    rcpts: list[tuple[Reply | None, str | None]], wait: float | None, age: float, null: bool
) -> None:
    a = attempt([f"r{i}@x" for i in range(len(rcpts))], attempts=3, scheduled=T0 + age / 2)
    if null:
        a.envelope.sender = ""
    for i, (_, notify) in enumerate(rcpts):
        if notify:
            a.envelope.rcpt_params[f"r{i}@x"] = {"NOTIFY": notify}
    j = judge(a.envelope.recipients, a.pending, {f"r{i}@x": r for i, (r, _) in enumerate(rcpts)})
    rules = RetryRules((4 * HOUR, 24 * HOUR), lifetime=5 * 86400)
    steps = plan(j, a, wait, rules, T0 + age)
    names = kinds(steps)
    # Exactly one final step, last: reschedule what is left, or remove.
    assert names[-1] in ("Reschedule", "Remove")
    assert names.count(names[-1]) == 1
    marks = [s for s in steps if isinstance(s, MarkDone)]
    sends = [i for i, s in enumerate(steps) if isinstance(s, SendNotice)]
    done = {i for m in marks for i in m.indexes}
    left = isinstance(steps[-1], Reschedule)
    if left:
        retry = set(indexes(j.transient))
        assert done | retry == set(a.pending)
        assert not done & retry
        assert names.index("CountAttempt") < len(steps) - 1
        final = steps[-1]
        assert isinstance(final, Reschedule)
        assert final.at > T0 + age
    else:
        assert "CountAttempt" not in names
    if j.delivered and (marks or sends):
        # The delivered ones are persisted before anything else.
        assert isinstance(steps[0], MarkDone)
        assert steps[0].indexes == indexes(j.delivered)
    for send in sends:  # bounced ones are marked only after their DSN is stored
        notice = steps[send]
        assert isinstance(notice, SendNotice)
        assert not null, "nothing is sent to the null sender"
        if notice.notice.action is Action.FAILED:
            later = {i for m in steps[send:] if isinstance(m, MarkDone) for i in m.indexes}
            reported = {
                v.index
                for v in j.permanent + j.transient
                if v.recipient in notice.notice.recipients
            }
            assert not left or reported <= later
    events = [e for s in steps for e in s.events]
    bounced = [r for e in events if e.kind is EventKind.BOUNCED for r in e.recipients]
    assert len(bounced) == len(set(bounced))  # each recipient in one bounced line


def _simulate(
    rules: RetryRules,
    backoff: DefaultBackoff,
    clock: ManualClock,
    ticks: list[float],
    flushes: set[int],
) -> tuple[list[float], list[tuple[float, float]]]:
    """Attempt a message that always fails transiently, at the first clock tick at or after each
    due time; returns the attempt times and (threshold, time warned) pairs."""
    env = Envelope("s@example.org", ["a@x"])
    env.timestamp = clock.time()
    due, made, attempts, warned = clock.time(), 0, [], []
    for n, tick in enumerate(ticks):
        clock._now = tick
        if n in flushes and due > tick:
            due = tick  # an operator's flush: due at once
        if tick < due:
            continue
        a = Attempt("q", env, made, (0,), due)
        attempts.append(tick)
        steps = plan(judge(["a@x"], (0,), LATER), a, backoff(env, made + 1), rules, tick)
        for s in notices(steps):
            if s.notice.action is Action.DELAYED:
                assert s.notice.delayed_for is not None
                warned.append((s.notice.delayed_for, tick))
        final = steps[-1]
        if isinstance(final, Remove):
            break
        assert isinstance(final, Reschedule)
        due, made = final.at, made + 1
    return attempts, warned


def test_default_backoff_warns_once_at_four_hours() -> None:
    clock = ManualClock(T0)
    rules = RetryRules((4 * HOUR,), lifetime=5 * 86400)
    backoff = DefaultBackoff(clock=clock, jitter=0.0)
    ticks = [T0 + 0.7 * n for n in range(1, 620_000)]  # every 0.7 s, never on 4 h
    attempts, warned = _simulate(rules, backoff, clock, [T0, *ticks], set())
    minutes = [round((t - T0) / 60) for t in attempts[:8]]
    # 0, 5, 15, 35, 75, 155 minutes, then the wake-up at 4 hours (the backoff said 5.25 h).
    assert minutes == [0, 5, 15, 35, 75, 155, 240, 480]
    [(threshold, at)] = warned
    assert threshold == 4 * HOUR
    assert at == min(t for t in attempts if t >= T0 + 4 * HOUR)


@settings(max_examples=60, deadline=None)
@given(
    thresholds=st.lists(st.floats(60, 4 * 86400), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    max_step=st.floats(120, 6 * HOUR),
    flush_every=st.integers(20, 400),
    jitter=st.floats(0, 0.5),
)
def test_each_threshold_warned_exactly_once_at_the_first_attempt_after_it(
    thresholds: list[float], seed: int, max_step: float, flush_every: int, jitter: float
) -> None:
    rng = random.Random(seed)
    clock = ManualClock(T0)
    rules = RetryRules(tuple(thresholds), lifetime=5 * 86400)
    backoff = DefaultBackoff(clock=clock, jitter=jitter, random=rng.random)
    ticks, now = [T0], T0
    while now < T0 + 5 * 86400 + 2 * max_step:  # uneven steps: a busy queue, outages
        now += rng.uniform(0.001, max_step)
        ticks.append(now)
    flushes = {n for n in range(len(ticks)) if n % flush_every == 0}
    attempts, warned = _simulate(rules, backoff, clock, ticks, flushes)
    assert attempts[-1] >= T0 + 5 * 86400  # given up at the end of the lifetime
    for threshold in rules.delay_warnings:
        first = min(t for t in attempts if t >= T0 + threshold)
        covering = [w for w in warned if w[1] == first]
        # Warned at the first attempt at or after it: with it, or with a later threshold
        # reached by the same attempt (one warning for both).
        assert covering
        assert covering[0][0] >= threshold
    times = [t for _, t in warned]
    assert len(times) == len(set(times))
    reported = sorted(t for t, _ in warned)
    assert len(reported) == len(set(reported)) <= len(rules.delay_warnings)


# -- several destinations, and postponing ----------------------------------------------------


def test_deliveries_recorded_early_are_not_marked_nor_logged_again() -> None:
    a = attempt(["a@x", "b@y", "c@y"])
    early = judge(["a@x"], (0,), {"a@x": OK})
    first = record_delivered(a.id, early.delivered)
    assert first.indexes == (0,)
    assert [(e.kind, e.recipients) for e in first.events] == [(EventKind.DELIVERED, ("a@x",))]
    last = judge(a.envelope.recipients, a.pending, {"a@x": OK, "b@y": OK, "c@y": LATER})
    steps = plan(last, a, 60.0, RetryRules(), T0, recorded={0})
    [mark] = [s for s in steps if isinstance(s, MarkDone)]
    assert mark.indexes == (1,)
    assert all("a@x" not in e.recipients for s in steps for e in s.events)
    assert kinds(steps) == ["MarkDone", "CountAttempt", "Reschedule"]


def test_all_delivered_after_an_early_record_is_one_removal() -> None:
    a = attempt(["a@x", "b@y"])
    j = judge(a.envelope.recipients, a.pending, {"a@x": OK, "b@y": OK})
    [remove] = plan(j, a, None, RetryRules(), T0, recorded={0})
    assert isinstance(remove, Remove)
    delivered = [e for e in remove.events if e.kind is EventKind.DELIVERED]
    assert [e.recipients for e in delivered] == [("b@y",)]


def test_postponing_keeps_attempts_and_reply_and_respects_the_rules() -> None:
    a = attempt(["a@x"], attempts=3, scheduled=T0 + HOUR)
    [step] = postpone(RetryRules(), a, "x", T0 + HOUR, T0 + HOUR + 40)
    assert isinstance(step, Reschedule)
    assert (step.at, step.last_reply) == (T0 + HOUR + 40, None)
    assert [e.kind for e in step.events] == [EventKind.POSTPONED]
    rules = RetryRules(delay_warnings=(2 * HOUR,), lifetime=4 * HOUR)
    [capped] = postpone(rules, a, "x", T0 + 2 * HOUR - 10, T0 + 3 * HOUR)
    assert isinstance(capped, Reschedule)
    assert capped.at == T0 + 2 * HOUR  # never past a warning threshold


def test_no_postponing_past_a_due_warning_or_the_lifetime() -> None:
    rules = RetryRules(delay_warnings=(HOUR,), lifetime=4 * HOUR)
    due = attempt(["a@x"], scheduled=T0 + HOUR - 60)
    assert not may_postpone(rules, due, T0 + HOUR)  # its window holds the warning
    assert may_postpone(rules, attempt(["a@x"], scheduled=T0 + HOUR + 1), T0 + 2 * HOUR)
    assert not may_postpone(rules, attempt(["a@x"], scheduled=T0 + 4 * HOUR), T0 + 4 * HOUR)
