"""The sharded Redis layout: shard tags spread over the slots, ids name their shard (pure)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from smtpq.storage.base import id_time, is_valid_id
from smtpq.storage.redis.layout import (
    DEFAULT_SHARDS,
    MAX_SHARDS,
    QueueKeys,
    ShardKeys,
    shard_id,
    shard_of,
    shard_tag,
)

tags = st.text(st.characters(codec="ascii", exclude_characters="{}"), min_size=1, max_size=12)


def masters_of(slots: list[int], masters: int) -> Counter[int]:
    """How many of ``slots`` each of ``masters`` equal contiguous slot ranges holds (as
    ``redis-cli --cluster create`` assigns them)."""
    return Counter(min(slot * masters // 16384, masters - 1) for slot in slots)


@pytest.mark.parametrize("shards", [DEFAULT_SHARDS, 32, 64])
@pytest.mark.parametrize("masters", [2, 3, 5, 10])
def test_shards_spread_evenly_over_masters(shards: int, masters: int) -> None:
    slots = [key_slot(shard_tag("q", k).encode()) for k in range(shards)]
    counts = masters_of(slots, masters)
    assert len(counts) == masters  # every master serves some shard
    assert max(counts.values()) - min(counts.values()) <= 1


@given(tags, st.integers(0, MAX_SHARDS - 1))
def test_a_shards_tag_depends_only_on_the_queue_and_the_shard(tag: str, shard: int) -> None:
    name = shard_tag(tag, shard)
    assert name.startswith(f"{tag}.{shard}")
    assert "{" not in name
    assert "}" not in name
    # Within 64 slots after the shard's point, whatever the number of shards.
    point = int(f"{shard:014b}"[::-1], 2)
    assert point <= key_slot(name.encode()) < point + 64


def test_the_first_shards_are_halves_then_quarters_of_the_slots() -> None:
    slots = [key_slot(shard_tag("q", k).encode()) for k in range(4)]
    assert [s // 4096 for s in slots] == [0, 2, 1, 3]


def test_shard_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        shard_tag("q", MAX_SHARDS)


@given(st.floats(1e9, 4e9), st.integers(0, MAX_SHARDS - 1))
def test_ids_name_their_shard_and_keep_their_arrival_time(timestamp: float, shard: int) -> None:
    id = shard_id(timestamp, shard)
    assert is_valid_id(id)
    assert shard_of(id) == shard
    assert id_time(id) == pytest.approx(timestamp, abs=1e-6)


def test_shard_of_a_string_that_is_no_id() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        shard_of("zz")
    with pytest.raises(ValueError, match="not a queue id"):
        shard_of("")


@given(tags, st.integers(0, MAX_SHARDS - 1), st.floats(1e9, 4e9))
def test_every_key_of_a_shard_is_in_one_slot(tag: str, shard: int, timestamp: float) -> None:
    keys = ShardKeys.of("smtpq:", tag, shard)
    id = shard_id(timestamp, shard)
    names = [keys.msg(id), keys.index, keys.schedule, keys.leases, keys.held, keys.migrated(id)]
    assert {key_slot(name.encode()) for name in [*names, keys.channel]} == {keys.slot}
    assert all(name.startswith("smtpq:") for name in names)


def test_the_queue_keys_are_the_format_1_layout() -> None:
    keys = QueueKeys.of("smtpq:", "q")
    assert keys.legacy.index == "smtpq:{q}:index"
    assert keys.legacy.msg("ab") == "smtpq:{q}:msg:ab"
    assert keys.channel == "smtpq:{q}:wake"  # the channel format-1 workers listen on
    names = [keys.layout, keys.moving, keys.moving_msg("ab"), keys.legacy.schedule]
    assert {key_slot(name.encode()) for name in names} == {keys.slot}
