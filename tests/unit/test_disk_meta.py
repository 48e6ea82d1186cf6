"""The meta file of DiskStorage: it round-trips, and load()'s fast reading agrees with the full
decoder."""

from __future__ import annotations

import math
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpq.storage.disk.meta import CorruptError, Meta, decode_meta, encode_meta, schedule_fields

replies = st.none() | st.dictionaries(
    st.sampled_from(["code", "message", "command", "address", "remote_host", "remote_dsn"]),
    st.none() | st.text(max_size=40) | st.booleans(),
)
metas = st.builds(
    Meta,
    timestamp=st.floats(allow_nan=False, allow_infinity=False),
    attempts=st.integers(0, 10**6),
    delivered=st.lists(st.integers(0, 1000), max_size=5),
    held=st.booleans(),
    last_reply=replies,
)


@given(metas)
def test_a_meta_round_trips_and_schedule_fields_agree(meta: Meta) -> None:
    data = encode_meta(meta)
    assert decode_meta(data) == meta
    assert schedule_fields(data) == (meta.timestamp, meta.held)


@given(metas, st.data())
def test_damaged_files_are_refused_alike(meta: Meta, data: st.DataObject) -> None:
    raw = bytearray(encode_meta(meta))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    damaged = bytes(raw)
    try:
        expected = decode_meta(damaged)
    except CorruptError:
        with pytest.raises(CorruptError):
            schedule_fields(damaged)
    else:  # a flip the checksum cannot see (none expected) must still read the same
        assert schedule_fields(damaged) == (expected.timestamp, expected.held)


def _framed(body: bytes) -> bytes:
    """A meta file with a valid header and checksum around ``body``."""
    return b"smtpq-meta 1 %08x\n%s\n" % (zlib.crc32(body), body)


@pytest.mark.parametrize(
    "data",
    [
        b"smtpq-meta 1 00000000\n{}\n",
        b"smtpq-meta 2 00000000\n{}\n",
        b"",
        encode_meta(Meta(1.0))[:-1],
        encode_meta(Meta(math.inf)),
        _framed(b'{"timestamp":1e999,"attempts":0,"delivered":[],"held":false,"last_reply":null}'),
        _framed(b'{"timestamp":1.0,"attempts":0,"delivered":[],"held":false,"last_reply":[]}'),
    ],
)
def test_schedule_fields_refuse_what_the_decoder_refuses(data: bytes) -> None:
    with pytest.raises(CorruptError):
        schedule_fields(data)
