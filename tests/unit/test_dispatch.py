"""The round-robin dispatcher over per-destination ready queues: examples and properties."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from smtpq.queue.destinations import (
    DeadMark,
    Destination,
    DestinationLimits,
    DestinationPolicy,
    Outcome,
    StartKind,
    State,
    Transition,
)
from smtpq.queue.dispatch import BACKLOG_FACTOR, Defer, Dispatcher, Start
from smtpq.reply import Reply

REFUSED = Reply("451", "4.4.1 No answer from host (connection refused)", "CONNECT")


def _policy(**limits: int | float) -> DestinationPolicy:
    return DestinationPolicy(default=DestinationLimits(**limits))  # type: ignore[arg-type]


def _fill(d: Dispatcher[str], name: str, n: int, now: float = 0.0) -> None:
    for i in range(n):
        assert d.push(name, f"{name}{i}", now)


def test_slots_go_round_robin_one_per_destination_per_round() -> None:
    d: Dispatcher[str] = Dispatcher(_policy(concurrency=20, initial_window=20))
    for name in ("a", "b", "c"):
        _fill(d, name, 10)
    starts = d.take(0.0, 7)
    assert [s.destination for s in starts] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [s.destination for s in d.take(0.0, 3)] == ["b", "c", "a"]  # the ring goes on


def test_a_destination_at_its_window_leaves_the_slots_to_others() -> None:
    d: Dispatcher[str] = Dispatcher(_policy())  # initial window 5
    _fill(d, "slow", 100)
    first = d.take(0.0, 100)
    assert len(first) == 5
    _fill(d, "fast", 3)
    assert [s.destination for s in d.take(0.0, 100)] == ["fast"] * 3
    d.finished("slow", Outcome.SUCCESS, None, 1.0, False)
    assert [s.destination for s in d.take(1.0, 100)] == ["slow"]


def test_a_dead_destination_defers_without_slots_then_probes_once() -> None:
    d: Dispatcher[str] = Dispatcher(_policy(cool_down=300))
    _fill(d, "dead", 20)
    for _ in d.take(0.0, 100):
        change = d.finished("dead", Outcome.FAILURE, REFUSED, 5.0, False)
    assert change is Transition.DIED
    deferred = d.take(5.0, 0)  # no slot needed
    assert len(deferred) == 15
    assert all(isinstance(x, Defer) for x in deferred)
    assert all("unreachable" in str(x.reply) for x in deferred if isinstance(x, Defer))
    _fill(d, "dead", 3, now=100.0)
    assert len(d.take(100.0, 100)) == 3  # still dead: deferred at once
    _fill(d, "dead", 3, now=305.0)
    [probe] = d.take(305.0, 100)
    assert isinstance(probe, Start)
    assert probe.probe
    assert d.take(306.0, 100) == []  # the others wait for the probe
    assert d.finished("dead", Outcome.SUCCESS, None, 307.0, True) is Transition.REVIVED
    assert [type(x) for x in d.take(307.0, 100)] == [Start, Start]


def test_a_rate_limited_destination_starts_one_per_take_in_order() -> None:
    policy = DestinationPolicy(patterns=(("paced", DestinationLimits(message_rate=10.0)),))
    d: Dispatcher[str] = Dispatcher(policy)
    _fill(d, "paced", 5)
    _fill(d, "free", 5)
    assert [s.destination for s in d.take(0.0, 100)] == ["paced", "free", *["free"] * 4]
    assert [s.item for s in d.take(0.1, 100)] == ["paced1"]


def test_a_postponable_backlog_is_bounded() -> None:
    d: Dispatcher[str] = Dispatcher(_policy(concurrency=2))
    admitted = [d.push("x", str(i), 0.0, postponable=True) for i in range(BACKLOG_FACTOR * 2 + 3)]
    assert admitted.count(True) == BACKLOG_FACTOR * 2
    assert d.push("x", "must", 0.0)  # one that may not be postponed is always taken


def test_a_destination_that_keeps_up_takes_more_than_its_backlog() -> None:
    d: Dispatcher[str] = Dispatcher(_policy(concurrency=2))
    dest = d.destination("x")
    for i in range(100):  # 50 results a second over 2 s
        t = i / 50
        dest.started(t, False)
        dest.finished(Outcome.SUCCESS, None, t, False)
    admitted = [d.push("x", str(i), 2.0, postponable=True) for i in range(60)]
    assert admitted.count(True) == 51  # until more than a second's worth waits (4 x 2 without)


def _dead_with_three_waiting() -> tuple[Dispatcher[str], Destination]:
    """A dispatcher whose destination ``x`` died at 0 s (a cool-down of 300 s), with three
    items queued for it at 1 s."""
    d: Dispatcher[str] = Dispatcher(_policy(dead_after=1, cool_down=300))
    dest = d.destination("x")
    dest.started(0.0, False)
    dest.finished(Outcome.FAILURE, Reply("451", "4.4.1 refused", "CONNECT"), 0.0, False)
    _fill(d, "x", 3, now=1.0)
    return d, dest


def test_a_flush_makes_a_dead_destination_probe_instead_of_deferring() -> None:
    d, _ = _dead_with_three_waiting()
    assert d.end_cool_downs(1.0) == ["x"]
    assert d.end_cool_downs(1.0) == []
    [start] = d.take(1.0, 10)
    assert isinstance(start, Start)
    assert start.probe  # one probe; the others wait for its outcome


def test_deferrals_taken_back_when_the_shared_store_ended_the_cool_down() -> None:
    d, dest = _dead_with_three_waiting()
    taken = d.take(1.0, 10)
    deferred = [x for x in taken if isinstance(x, Defer)]
    assert len(deferred) == len(taken) == 3
    assert (dest.deferred, d.waiting_for("x")) == (3, 0)
    assert not d.reconcile("x", dest.mark(), 1.0)  # the store says what we know
    assert d.reconcile("x", None, 1.0)  # revived elsewhere
    for x in reversed(deferred):
        d.take_back("x", x.item, 1.0, postponable=False)
    assert (dest.deferred, d.waiting_for("x")) == (0, 3)
    [start] = d.take(1.0, 10)
    assert isinstance(start, Start)
    assert (start.item, start.probe) == (deferred[0].item, True)


def test_items_that_waited_too_long_are_released_postponable_ones_only() -> None:
    d: Dispatcher[str] = Dispatcher(DestinationPolicy(max_wait=60))
    d.push("x", "old", 0.0, postponable=True)
    d.push("x", "kept", 0.0)
    d.push("x", "young", 50.0, postponable=True)
    assert [r.item for r in d.sweep(61.0)] == ["old"]
    assert d.waiting_for("x") == 2


def test_a_store_refusal_blocks_the_destination_until_its_time() -> None:
    d: Dispatcher[str] = Dispatcher(_policy())
    _fill(d, "x", 2)
    [first, second] = d.take(0.0, 2)
    d.unstart("x", first.item, 0.0, probe=False, postponable=False, until=0.5)
    d.unstart("x", second.item, 0.0, probe=False, postponable=False, until=0.5)
    assert d.take(0.2, 10) == []
    assert d.next_wakeup() == 0.5
    assert [s.item for s in d.take(0.5, 10)] == ["x1", "x0"]  # given back to the front


def test_a_mark_from_the_store_defers_what_waits() -> None:
    d: Dispatcher[str] = Dispatcher(_policy())
    _fill(d, "x", 3)
    [start] = d.take(0.0, 1)
    d.unstart("x", start.item, 0.0, probe=False, postponable=False, mark=DeadMark(90, "e", 300))
    assert len(d.take(1.0, 10)) == 3
    assert d.destination("x").state is State.DEAD


def test_new_limits_apply_to_known_destinations_at_once() -> None:
    d: Dispatcher[str] = Dispatcher(_policy(concurrency=20, initial_window=10))
    _fill(d, "x", 30)
    assert len(d.take(0.0, 100)) == 10
    d.set_policy(_policy(concurrency=4))
    assert d.destination("x").window == 4
    assert d.take(0.0, 100) == []  # 10 run on; none starts until fewer than 4 run
    for _ in range(7):
        d.finished("x", Outcome.SUCCESS, None, 1.0, False)
    assert len(d.take(1.0, 100)) == 1


def test_withdraw_and_forget() -> None:
    d: Dispatcher[str] = Dispatcher(_policy())
    _fill(d, "x", 2)
    assert sorted(item for _, item in d.withdraw()) == ["x0", "x1"]
    assert d.waiting == 0
    d.sweep(10_000.0)
    assert "x" not in d


@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 12)), min_size=1, max_size=8),
    st.integers(1, 60),
)
def test_within_one_take_no_destination_gets_a_second_slot_before_the_others_one(
    dests: list[tuple[int, int]], free: int
) -> None:
    windows = [DestinationLimits(initial_window=w) for w, _ in dests]
    policy = DestinationPolicy(patterns=tuple((f"d{i}", w) for i, w in enumerate(windows)))
    d: Dispatcher[str] = Dispatcher(policy)
    caps = {}
    for i, (window, items) in enumerate(dests):
        _fill(d, f"d{i}", items)
        caps[f"d{i}"] = min(window, items)
    order = [s.destination for s in d.take(0.0, free)]
    assert len(order) == min(free, sum(caps.values()))
    for x in caps:
        positions = [p for p, name in enumerate(order) if name == x]
        for i, j in itertools.pairwise(positions):
            for y, cap in caps.items():
                had_room = Counter(order[:i])[y] < cap
                assert not had_room or y in order[i:j] or y == x


class DispatchMachine(RuleBasedStateMachine):
    """Random pushes, takes, outcomes and time: windows, probes and fairness hold."""

    names = ("a", "b", "c", "d")

    @initialize(
        concurrency=st.integers(1, 6), dead_after=st.integers(0, 3), cool_down=st.integers(5, 50)
    )
    def setup(self, concurrency: int, dead_after: int, cool_down: int) -> None:
        limits = DestinationLimits(
            concurrency=concurrency, initial_window=2, dead_after=dead_after,
            cool_down=float(cool_down), max_cool_down=200.0,
        )  # fmt: skip
        self.d: Dispatcher[int] = Dispatcher(DestinationPolicy(default=limits))
        self.now = 0.0
        self.seq = 0
        self.running: list[Start[int]] = []
        #: Starts given to others while each destination could start (reset when it starts).
        self.passed_over: Counter[str] = Counter()
        #: When each destination died (a probe may start only after its cool-down), and
        #: whether its probe started since.
        self.died: dict[str, tuple[float, bool]] = {}

    @rule(name=st.sampled_from(names), n=st.integers(1, 5))
    def push(self, name: str, n: int) -> None:
        for _ in range(n):
            self.seq += 1
            self.d.push(name, self.seq, self.now)

    @rule(free=st.integers(0, 3))
    def take(self, free: int) -> None:
        def could_start(name: str) -> bool:
            kind = self.d.destination(name).start_kind(self.now)
            return self.d.waiting_for(name) > 0 and kind in (StartKind.START, StartKind.PROBE)

        for decision in self.d.take(self.now, free):
            if not isinstance(decision, Start):
                continue
            name = decision.destination
            # One round: no destination waits while k - 1 others get a slot twice over.
            assert self.passed_over[name] <= len(self.names) - 1
            for other in self.names:
                if other != name and could_start(other):
                    self.passed_over[other] += 1
            self.passed_over[name] = 0
            if decision.probe:
                died_at, probed = self.died[name]
                dest = self.d.destination(name)
                assert not probed
                assert self.now >= died_at
                self.died[name] = (died_at, True)
                assert dest.state is State.PROBING
            self.running.append(decision)
        for name in self.names:
            if not could_start(name):
                self.passed_over[name] = 0

    @precondition(lambda self: bool(self.running))
    @rule(
        index=st.integers(0, 100),
        outcome=st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.NEUTRAL]),
    )
    def finish(self, index: int, outcome: Outcome) -> None:
        start = self.running.pop(index % len(self.running))
        change = self.d.finished(start.destination, outcome, REFUSED, self.now, start.probe)
        dest = self.d.destination(start.destination)
        if change is Transition.DIED:
            self.died[start.destination] = (dest.dead_until, False)

    @rule(seconds=st.sampled_from([0.5, 5.0, 60.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def windows_within_bounds(self) -> None:
        for name in self.names:
            if name in self.d:
                dest = self.d.destination(name)
                assert 1 <= dest.window <= dest.limits.concurrency
                assert 0 <= dest.in_flight <= dest.limits.concurrency
        assert self.d.running == len(self.running)


TestDispatchMachine = DispatchMachine.TestCase
