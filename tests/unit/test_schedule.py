"""LocalSchedule: a message is claimed once however often it was rescheduled."""

from __future__ import annotations

from smtpq.storage.schedule import LocalSchedule

NOW = 1_800_000_000.0


def test_rescheduled_to_the_same_time_is_claimed_once() -> None:
    schedule = LocalSchedule()
    schedule.add("a", NOW)
    schedule.add("b", NOW)
    for _ in range(3):
        schedule.reschedule("a", NOW)
        assert schedule.flush(NOW, ["b"]) == ["b"]
    assert sorted(schedule.claim(NOW, 100, NOW + 60)) == ["a", "b"]
    assert schedule.claim(NOW, 100, NOW + 60) == []
    assert schedule.next_due() == NOW + 60


def test_reload_and_release_do_not_duplicate_claims() -> None:
    schedule = LocalSchedule()
    schedule.add("a", NOW)
    assert schedule.claim(NOW, 10, NOW + 60) == ["a"]
    schedule.release("a")
    schedule.release("a")
    schedule.add("a", NOW)  # a reload of the same message
    assert schedule.claim(NOW, 10, NOW + 60) == ["a"]
    assert schedule.claim(NOW + 59, 10, NOW + 120) == []
    assert schedule.claim(NOW + 60, 10, NOW + 120) == ["a"]  # the lease ran out


def test_held_while_leased_is_not_claimed_after_its_lease() -> None:
    schedule = LocalSchedule()
    schedule.add("a", NOW, lease_until=NOW + 60)
    schedule.hold("a", True)
    schedule.renew(["a"], NOW + 60)
    assert schedule.claim(NOW + 100, 10, NOW + 160) == []
    schedule.hold("a", False)
    assert schedule.claim(NOW + 100, 10, NOW + 160) == ["a"]
