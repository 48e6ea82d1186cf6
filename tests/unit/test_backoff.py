"""Backoff functions."""

from __future__ import annotations

import pytest

from smtpq.backoff import DefaultBackoff, exponential_backoff
from smtpq.clock import ManualClock
from smtpq.envelope import Envelope


def test_seed_documentation_function() -> None:
    env = Envelope()
    assert [exponential_backoff(env, n) for n in range(1, 7)] == [60, 300, 1500, 7500, 37500, None]


def _env(ts: float) -> Envelope:
    env = Envelope("a@b", ["c@d"])
    env.timestamp = ts
    return env


def test_default_grows_to_hours_and_caps() -> None:
    clock = ManualClock()
    backoff = DefaultBackoff(clock=clock, jitter=0.0)
    env = _env(clock.time())
    waits = [backoff(env, n) for n in range(1, 9)]
    assert waits == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]
    assert backoff(env, 10_000) == 14400  # no overflow for huge counts


def test_default_jitter_spreads_within_bounds() -> None:
    clock = ManualClock()
    low = DefaultBackoff(clock=clock, jitter=0.1, random=lambda: 0.0)(_env(clock.time()), 1)
    high = DefaultBackoff(clock=clock, jitter=0.1, random=lambda: 0.999999)(_env(clock.time()), 1)
    assert low == pytest.approx(270)
    assert high == pytest.approx(330, rel=1e-4)


def test_default_lasts_five_days_with_a_last_attempt_at_the_end() -> None:
    clock = ManualClock()
    backoff = DefaultBackoff(clock=clock, jitter=0.0)
    env = _env(clock.time())
    attempts, total = 0, 0.0
    while True:
        attempts += 1
        wait = backoff(env, attempts)
        if wait is None:
            break
        total += wait
        clock._now += wait
    assert total == pytest.approx(5 * 86400)
    assert 30 <= attempts <= 45  # enough tries, hours apart at the end


def test_default_validates_parameters() -> None:
    with pytest.raises(ValueError, match="initial"):
        DefaultBackoff(initial=0)
    with pytest.raises(ValueError, match="jitter"):
        DefaultBackoff(jitter=1.5)
