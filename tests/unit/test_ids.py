"""Queue ids: time-ordered, fixed form."""

from __future__ import annotations

import pytest

from smtpq.storage.base import id_time, is_valid_id, new_id


def test_ids_sort_by_time_and_encode_it() -> None:
    ids = [new_id(1_800_000_000.0 + i * 0.001) for i in range(100)]
    assert ids == sorted(ids)
    assert id_time(ids[5]) == pytest.approx(1_800_000_000.005, abs=1e-6)
    assert len(set(new_id(1_800_000_000.0) for _ in range(1000))) == 1000


@pytest.mark.parametrize(
    ("id", "ok"),
    [
        (new_id(1_800_000_000.0), True),
        ("../../etc/passwd", False),
        ("A" * 32, False),
        ("0" * 31, False),
        ("0" * 31 + "/", False),
    ],
)
def test_is_valid_id(id: str, ok: bool) -> None:
    assert is_valid_id(id) is ok
