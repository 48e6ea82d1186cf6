"""LocalSchedule: a message is claimed once however often it was rescheduled."""

from __future__ import annotations

import pytest

from smtpq.storage import schedule as schedule_module
from smtpq.storage.base import id_time, new_id
from smtpq.storage.schedule import LocalSchedule, id_key, key_id

NOW = 1_800_000_000.0
A, B, C = new_id(NOW - 30), new_id(NOW - 20), new_id(NOW - 10)


def test_rescheduled_to_the_same_time_is_claimed_once() -> None:
    schedule = LocalSchedule()
    schedule.add(A, NOW)
    schedule.add(B, NOW)
    for _ in range(3):
        schedule.reschedule(A, NOW)
        assert schedule.flush(NOW, [B]) == [B]
    assert sorted(schedule.claim(NOW, 100, NOW + 60)) == [A, B]
    assert schedule.claim(NOW, 100, NOW + 60) == []
    assert schedule.next_due() == NOW + 60


def test_reload_and_release_do_not_duplicate_claims() -> None:
    schedule = LocalSchedule()
    schedule.add(A, NOW)
    assert schedule.claim(NOW, 10, NOW + 60) == [A]
    schedule.release(A)
    schedule.release(A)
    schedule.add(A, NOW)  # a reload of the same message
    assert schedule.claim(NOW, 10, NOW + 60) == [A]
    assert schedule.claim(NOW + 59, 10, NOW + 120) == []
    assert schedule.claim(NOW + 60, 10, NOW + 120) == [A]  # the lease ran out


def test_held_while_leased_is_not_claimed_after_its_lease() -> None:
    schedule = LocalSchedule()
    schedule.add(A, NOW, lease_until=NOW + 60)
    schedule.hold(A, True)
    schedule.renew([A], NOW + 60)
    assert schedule.claim(NOW + 100, 10, NOW + 160) == []
    schedule.hold(A, False)
    assert schedule.claim(NOW + 100, 10, NOW + 160) == [A]


def test_ids_are_kept_compactly_and_come_back_unchanged() -> None:
    id = new_id(NOW)
    assert key_id(id_key(id)) == id
    assert key_id(id_key("0" * 32)) == "0" * 32
    for bad in ("a", "A" * 32, "0x" + "0" * 30, " " + "0" * 31, "g" * 32):
        with pytest.raises(ValueError, match="not a queue id"):
            id_key(bad)
    schedule = LocalSchedule()
    with pytest.raises(ValueError, match="not a queue id"):
        schedule.add("a", NOW)
    assert "a" not in schedule
    schedule.discard("a")  # unknown: nothing to do
    schedule.reschedule("a", NOW)
    with pytest.raises(KeyError):
        schedule.hold("a", True)


def test_time_size_and_state_through_lease_hold_and_release() -> None:
    schedule = LocalSchedule()
    schedule.add(A, NOW)
    schedule.add(B, NOW + 100, held=True)
    schedule.add(C, NOW + 5, lease_until=NOW + 60)
    assert len(schedule) == 3
    assert (A in schedule, B in schedule, C in schedule) == (True, True, True)
    assert (schedule.timestamp(A), schedule.timestamp(B), schedule.timestamp(C)) == (
        NOW, NOW + 100, NOW + 5
    )  # fmt: skip
    assert schedule.claim(NOW, 10, NOW + 60) == [A]
    assert schedule.timestamp(A) == NOW  # leased: its attempt time is kept apart
    assert len(schedule) == 3
    schedule.hold(A, True)  # held while leased: stays leased until the attempt ends
    assert schedule.stats()["active"] == 2
    schedule.reschedule(A, NOW + 300)  # the attempt ends: held, at its new time
    assert schedule.is_held(A)
    assert schedule.timestamp(A) == NOW + 300
    assert schedule.stats() == {"held": 2, "active": 1, "oldest": id_time(A)}
    schedule.hold(A, False)
    schedule.hold(B, False)
    schedule.release(C)
    assert schedule.claim(NOW + 299, 10, NOW + 400) == [C, B]
    assert schedule.claim(NOW + 300, 10, NOW + 400) == [A]
    assert len(schedule) == 3
    for id in (A, B, C):
        schedule.discard(id)
    assert len(schedule) == 0
    assert schedule.next_due() is None
    assert schedule.stats()["oldest"] is None


async def test_rebuild_keeps_leases_and_holds_and_lists_in_id_order() -> None:
    schedule = LocalSchedule()
    schedule.add(B, NOW, lease_until=NOW + 60)
    times = {id_key(A): NOW + 10, id_key(B): NOW + 20, id_key(C): NOW + 30}
    schedule.rebuild(times, {id_key(C)}, schedule.leases())
    assert len(schedule) == 3
    assert schedule.is_held(C)
    assert schedule.timestamp(B) == NOW + 20
    assert schedule.leases() == {B: NOW + 60}
    assert sorted(schedule.entries()) == [(NOW + 10, A), (NOW + 20, B), (NOW + 30, C)]
    assert schedule.ids() == [A, B, C]
    assert [page async for page in schedule.pages(2)] == [[A, B], [C]]
    assert schedule.claim(NOW + 59, 10, NOW + 100) == [A]
    assert schedule.claim(NOW + 60, 10, NOW + 100) == [B]  # the kept lease ran out


def test_heap_stays_proportional_to_the_messages_under_reschedules() -> None:
    schedule = LocalSchedule()
    ids = [new_id(NOW + i) for i in range(100)]
    for id in ids:
        schedule.add(id, NOW + 1000)
    for step in range(100):
        for id in ids:
            schedule.reschedule(id, NOW + 2000 + step)
    assert len(schedule._heap) <= max(1024, 2 * len(ids)) + 1
    assert schedule.claim(NOW + 2098, 1000, NOW + 3000) == []
    assert sorted(schedule.claim(NOW + 2099, 1000, NOW + 3000)) == ids


def test_flush_all_makes_every_unleased_unheld_message_due() -> None:
    schedule = LocalSchedule()
    schedule.add(A, NOW + 100)
    schedule.add(B, NOW + 100, held=True)
    schedule.add(C, NOW + 100, lease_until=NOW + 60)
    assert schedule.flush(NOW) == [A]
    assert schedule.claim(NOW, 10, NOW + 60) == [A]


async def test_pages_merge_sorted_slices_in_id_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule_module, "_SORT_SLICE", 7)
    schedule = LocalSchedule()
    ids = sorted(new_id(NOW + i % 13) for i in range(100))
    for i, id in enumerate(reversed(ids)):
        schedule.add(id, NOW + i, held=i % 9 == 0, lease_until=NOW + 60 if i % 5 == 0 else None)
    pages = [page async for page in schedule.pages(30)]
    assert [len(p) for p in pages] == [30, 30, 30, 10]
    assert [id for page in pages for id in page] == ids == schedule.ids()


def test_oldest_follows_additions_removals_and_rebuilds() -> None:
    schedule = LocalSchedule()
    ids = [new_id(NOW - 100 + i) for i in range(6)]
    for id in ids[2:]:
        schedule.add(id, NOW)
    assert schedule.stats()["oldest"] == id_time(ids[2])
    schedule.add(ids[1], NOW, held=True)  # older than the oldest known
    assert schedule.stats()["oldest"] == id_time(ids[1])
    schedule.claim(NOW, 10, NOW + 60)
    schedule.hold(ids[3], True)
    assert schedule.stats()["oldest"] == id_time(ids[1])  # leased and held ones count too
    schedule.discard(ids[1])
    assert schedule.stats()["oldest"] == id_time(ids[2])
    schedule.discard(ids[4])  # not the oldest
    assert schedule.stats()["oldest"] == id_time(ids[2])
    schedule.rebuild({id_key(ids[0]): NOW, id_key(ids[5]): NOW}, set())
    assert schedule.stats()["oldest"] == id_time(ids[0])
    schedule.clear()
    assert schedule.stats()["oldest"] is None
    schedule.add(ids[5], NOW)
    assert schedule.stats()["oldest"] == id_time(ids[5])
