"""Which shards a worker claims from, and when (pure rules, no Redis, no event loop)."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from smtpq.storage.redis.due import DueTimes

NOW = 1_800_000_000.0


def known(shards: int, due: dict[int, float | None], start: int = 0) -> DueTimes:
    """DueTimes that learnt ``due`` (shard -> due time, None: empty) and nothing else empty."""
    times = DueTimes(shards, start, rng=random.Random(1))
    for k in range(shards):
        times.learn(k, due.get(k))
    return times


def test_nothing_is_known_at_first_so_everything_is_looked_at() -> None:
    times = DueTimes(4, 2)
    assert times.unknown
    assert times.claimable(NOW) == [2, 3, 0, 1]  # from the start shard on


def test_only_due_shards_are_claimable_in_turn_from_the_cursor() -> None:
    times = known(5, {0: NOW - 1, 1: NOW + 10, 3: NOW, 4: NOW - 5}, start=3)
    assert not times.unknown
    assert times.claimable(NOW) == [3, 4, 0]
    times.advance(3)
    assert times.claimable(NOW) == [4, 0, 3]
    assert times.next_due() == NOW - 5
    assert known(3, {}).next_due() is None


def test_an_announcement_only_brings_a_due_time_forward() -> None:
    times = known(2, {0: NOW + 100})
    times.hint(0, NOW + 200)
    assert times.due(0) == NOW + 100
    times.hint(0, NOW + 5)
    times.hint(1, NOW + 7)
    times.hint(9, NOW)  # a shard this worker does not know yet: ignored
    assert (times.due(0), times.due(1)) == (NOW + 5, NOW + 7)


def test_a_lost_race_backs_the_shard_off_and_a_win_ends_it() -> None:
    times = known(2, {0: NOW, 1: NOW})
    times.claimed(0, NOW, got=0, dropped=0, due=NOW + 60)  # another worker took it
    times.hint(0, NOW)  # and the next one is announced at once
    assert times.claimable(NOW) == [1]
    later = NOW + 2.0  # the back-off ends within its cap
    assert times.claimable(later) == [0, 1]
    assert times.next_due() == NOW  # shard 1 is due
    times.claimed(0, later, got=3, dropped=0, due=NOW + 60)
    times.hint(0, later)
    assert times.claimable(later) == [0, 1]


def test_back_off_doubles_with_each_loss_up_to_its_cap() -> None:
    times = known(1, {0: NOW})
    ends = []
    for _ in range(8):
        times.claimed(0, NOW, got=0, dropped=0, due=NOW)
        ends.append(times.next_due())
    waits = [end - NOW for end in ends if end is not None]
    assert waits[0] <= 0.05
    assert waits[4] >= 0.4  # 0.05 * 2**4 * (at least one half)
    assert max(waits) <= 2.0


def test_held_messages_leaving_the_schedule_are_no_lost_race() -> None:
    times = known(1, {0: NOW})
    times.claimed(0, NOW, got=0, dropped=2, due=None)
    times.learn(0, NOW)
    assert times.claimable(NOW) == [0]


def test_our_own_change_that_makes_work_due_ends_a_back_off() -> None:
    times = known(1, {0: NOW})
    times.claimed(0, NOW, got=0, dropped=0, due=NOW + 60)
    times.learn(0, NOW)  # e.g. this worker flushed, or wrote a message due now
    assert times.claimable(NOW) == [0]


def test_a_failed_shard_is_tried_again_after_a_back_off() -> None:
    times = known(2, {0: NOW + 10, 1: NOW + 10})
    times.failed(0, NOW)
    assert not times.unknown  # reading it again at once would fail again
    assert times.claimable(NOW) == []
    retry = times.next_due()
    assert retry is not None
    assert NOW < retry <= NOW + 0.05
    assert times.claimable(retry) == [0]


def test_resize_and_forget() -> None:
    times = known(2, {0: NOW})
    times.resize(4)
    assert len(times) == 4
    assert times.unknown
    assert times.claimable(NOW) == [0, 2, 3]
    times.forget()
    assert times.due(0) == -math.inf


events = st.lists(
    st.tuples(
        st.sampled_from(["learn", "hint", "claim", "fail", "advance"]),
        st.integers(0, 5),
        st.none() | st.floats(-100, 100),
        st.integers(0, 3),
    ),
    max_size=60,
)


@given(events, st.floats(-100, 100))
def test_claimable_shards_are_due_not_backed_off_and_each_once(
    history: list[tuple[str, int, float | None, int]], at: float
) -> None:
    times = DueTimes(6, 0, rng=random.Random(0))
    for kind, shard, when, got in history:
        if kind == "learn":
            times.learn(shard, None if when is None else NOW + when)
        elif kind == "hint" and when is not None:
            times.hint(shard, NOW + when)
        elif kind == "claim":
            times.claimed(shard, NOW, got, 0, None if when is None else NOW + when)
        elif kind == "fail":
            times.failed(shard, NOW)
        else:
            times.advance(shard)
    now = NOW + at
    claimable = times.claimable(now)
    assert len(claimable) == len(set(claimable))
    for shard in claimable:
        due = times.due(shard)
        assert due is not None
        assert due <= now
    following = times.next_due()
    if claimable:
        assert following is not None
        assert following <= now
    elif following is not None:
        assert following > now or not any(times.due(k) is not None for k in range(6))
