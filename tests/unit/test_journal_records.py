"""The journal's records and index: format, damage, replay, segment accounting (pure)."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpq.storage.base import new_id
from smtpq.storage.disk.meta import Meta
from smtpq.storage.journal.index import Entry, Index
from smtpq.storage.journal.records import (
    HEADER_SIZE,
    SEGMENT_HEADER,
    Kind,
    Record,
    Scan,
    encode,
    scan,
)

NOW = 1_800_000_000.0


def segment(*records: list[bytes]) -> bytes:
    return SEGMENT_HEADER + b"".join(b"".join(r) for r in records)


def ids(n: int) -> list[str]:
    return [new_id(NOW + i) for i in range(n)]


def read(data: bytes) -> tuple[list[Record], Scan]:
    found = Scan()
    return list(scan(data, found)), found


def test_records_read_back_with_their_envelope_in_place() -> None:
    a, b = ids(2)
    env = b"ENVELOPE-BYTES" * 10
    data = segment(
        encode(Kind.WRITE, a, Meta(NOW), env),
        encode(Kind.META, a, Meta(NOW + 60, attempts=1, delivered=[0], held=True)),
        encode(Kind.WRITE, b, Meta(NOW), b"other"),
        encode(Kind.REMOVE, b),
    )
    records, found = read(data)
    assert [(r.kind, r.id) for r in records] == [
        (Kind.WRITE, a),
        (Kind.META, a),
        (Kind.WRITE, b),
        (Kind.REMOVE, b),
    ]
    first = records[0]
    assert data[first.env_offset : first.env_offset + first.env_size] == env
    assert records[1].meta == Meta(NOW + 60, attempts=1, delivered=[0], held=True)
    assert found.bad == []
    assert found.end == len(data)
    assert found.header_ok


def test_a_torn_tail_is_reported_where_the_good_data_ends() -> None:
    a, b = ids(2)
    whole = segment(encode(Kind.WRITE, a, Meta(NOW), b"x" * 100))
    torn = b"".join(encode(Kind.WRITE, b, Meta(NOW), b"y" * 100))
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, len(torn) - 1):
        records, found = read(whole + torn[:cut])
        assert [r.id for r in records] == [a]
        assert found.end == len(whole)
        assert found.bad == []


def test_a_damaged_record_costs_only_itself() -> None:
    a, b, c = ids(3)
    first = b"".join(encode(Kind.WRITE, a, Meta(NOW), b"a" * 50))
    second = bytearray(b"".join(encode(Kind.WRITE, b, Meta(NOW), b"b" * 50)))
    second[HEADER_SIZE + 30] ^= 0x01  # one bit flipped: the CRC no longer matches
    third = b"".join(encode(Kind.WRITE, c, Meta(NOW), b"c" * 50))
    data = SEGMENT_HEADER + first + bytes(second) + third
    records, found = read(data)
    assert [r.id for r in records] == [a, c]
    start = len(SEGMENT_HEADER) + len(first)
    assert found.bad == [(start, start + len(second))]
    assert found.end == len(data)


def test_a_record_with_a_good_crc_but_a_bad_shape_is_damage() -> None:
    (a,) = ids(1)
    payload = b"\x03abc"  # an id that is no queue id
    crc = zlib.crc32(payload, zlib.crc32(bytes((Kind.REMOVE,))))
    header = struct.pack(">2sBII", b"SJ", Kind.REMOVE, len(payload), crc)
    good = b"".join(encode(Kind.REMOVE, a))
    records, found = read(SEGMENT_HEADER + header + payload + good)
    assert [r.id for r in records] == [a]
    assert len(found.bad) == 1


def test_a_damaged_segment_header_costs_only_itself() -> None:
    (a,) = ids(1)
    data = bytearray(segment(encode(Kind.WRITE, a, Meta(NOW), b"x" * 10)))
    data[2] ^= 0x04  # "smtpq" -> "swtpq"
    records, found = read(bytes(data))
    assert [r.id for r in records] == [a]
    assert found.header_ok
    assert found.bad == [(0, len(SEGMENT_HEADER))]


def test_another_format_is_not_read() -> None:
    (a,) = ids(1)
    data = b"smtpq-journal 2\n" + b"".join(encode(Kind.REMOVE, a))
    records, found = read(data)
    assert records == []
    assert not found.header_ok


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(list(Kind)), st.binary(max_size=300)), min_size=1, max_size=8
    ),
    st.data(),
)
def test_any_damage_leaves_every_untouched_record_readable(
    ops: list[tuple[Kind, bytes]], data: st.DataObject
) -> None:
    """Overwrite any stretch of a segment with anything: every record outside the stretch is
    still read, nothing inside it is read as a record that was not written, and the scan
    never raises."""
    chosen = ids(len(ops))
    encoded = [
        b"".join(encode(k, i, Meta(NOW), env)) for (k, env), i in zip(ops, chosen, strict=True)
    ]
    raw = bytearray(SEGMENT_HEADER + b"".join(encoded))
    start = data.draw(st.integers(len(SEGMENT_HEADER), len(raw) - 1))
    end = data.draw(st.integers(start + 1, len(raw)))
    raw[start:end] = data.draw(st.binary(min_size=end - start, max_size=end - start))
    records, _found = read(bytes(raw))
    written = {}
    pos = len(SEGMENT_HEADER)
    for chunk, id in zip(encoded, chosen, strict=True):
        written[pos] = (id, pos + len(chunk))
        pos += len(chunk)
    read_at = {r.offset: r for r in records}
    for offset, (id, stop) in written.items():
        if stop <= start or offset >= end:
            assert read_at[offset].id == id
    for record in records:
        assert record.offset in written
        assert record.id == written[record.offset][0]


def test_the_index_replays_to_the_queue_and_accounts_each_segment() -> None:
    a, b, c = ids(3)
    index = Index()
    index.apply(1, Record(Kind.WRITE, a, 16, 100, Meta(NOW), 40, 76))
    index.apply(1, Record(Kind.WRITE, b, 116, 200, Meta(NOW), 140, 176))
    index.apply(2, Record(Kind.META, a, 16, 50, Meta(NOW + 1, attempts=1)))
    index.apply(2, Record(Kind.REMOVE, b, 66, 30))
    index.apply(2, Record(Kind.META, c, 96, 50, Meta(NOW)))  # unknown: its write is gone
    index.grown(1, 316)
    index.grown(2, 146)
    assert set(index.entries) == {a}
    assert index.entries[a].meta.attempts == 1
    assert index.live_bytes == {1: 100}
    assert index.by_segment == {1: {a}}
    assert index.deletable(active=2) is None  # segment 1 still holds a
    # Less than half of segment 1 is alive: its message should move.
    assert index.to_compact(active=2, slack=10_000) == 1
    index.put(a, Entry(Meta(NOW + 1, attempts=1), 2, 170, 60, 100))
    assert index.deletable(active=2) == 1
    index.dropped(1)
    assert index.deletable(active=2) is None  # only the active segment is left
    assert index.total_bytes == 146
    assert index.total_live == 100


def test_only_the_oldest_segment_may_go() -> None:
    a = ids(1)[0]
    index = Index()
    for segment in (1, 2, 3):
        index.grown(segment, 1000)
    index.put(a, Entry(Meta(NOW), 1, 40, 900, 950))
    # Segment 2 holds nothing alive, but segment 1 is older: 2 may hold removals for it.
    assert index.deletable(active=3) is None
    assert index.to_compact(active=3, slack=0) == 1  # 3,000 on disk for 950 alive
    assert index.to_compact(active=3, slack=10_000) is None  # mostly alive, within slack
