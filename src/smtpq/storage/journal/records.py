"""The records of a journal segment: their format and codec (pure, no I/O).

A segment file starts with :data:`SEGMENT_HEADER` and holds records one after the other::

    magic "SJ" | kind (1 octet) | payload length (4, big-endian) | CRC-32 of kind + payload (4)
    payload

* ``WRITE`` (``W``): id length (1), id, meta length (4), meta (:func:`encode_meta`), envelope
  (:meth:`~smtpq.envelope.Envelope.to_bytes`, the rest). A message exists from its first
  ``WRITE``; a later ``WRITE`` of the same id (compaction moves a message to the newest
  segment) replaces its envelope's location and its meta.
* ``META`` (``M``): id length (1), id, meta — the message's whole mutable state.
* ``REMOVE`` (``R``): id length (1), id.

Replaying the records in order gives the queue. A reader checks every record's CRC and shape;
:func:`scan` never stops at a bad one: it looks for the next good record and reports the bytes
in between (:class:`Scan`), so that one damaged record costs only itself. Bytes at the end that
hold no whole good record are the *torn tail* of a write that a crash interrupted (never
acknowledged: a write returns only after its flush). A damaged segment header is such a
stretch too when good records follow; another version's header is never read past.
Nothing is pickled.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from smtpq.storage.base import is_valid_id
from smtpq.storage.disk.meta import CorruptError, Meta, decode_meta, encode_meta

__all__ = [
    "HEADER_SIZE",
    "SEGMENT_HEADER",
    "Kind",
    "Record",
    "Scan",
    "encode",
    "scan",
]

#: The first bytes of every segment file: the format and its version.
SEGMENT_HEADER = b"smtpq-journal 1\n"
_FORMAT = b"smtpq-journal "
_MAGIC = b"SJ"
_HEADER = struct.Struct(">2sBII")
#: Bytes of a record's header.
HEADER_SIZE = _HEADER.size
#: Largest payload a reader accepts (a message is capped far below this by the edge).
MAX_PAYLOAD = 1 << 30
_U32 = struct.Struct(">I")


class Kind(enum.IntEnum):
    """What a record says."""

    WRITE = ord("W")
    META = ord("M")
    REMOVE = ord("R")


@dataclass(frozen=True, slots=True)
class Record:
    """One record read back.

    :ivar offset: where the record starts in its segment.
    :ivar size: bytes of the whole record, header included.
    :ivar env_offset: where a ``WRITE``'s envelope starts in the segment (0 otherwise).
    :ivar env_size: bytes of that envelope.
    """

    kind: Kind
    id: str
    offset: int
    size: int
    meta: Meta | None = None
    env_offset: int = 0
    env_size: int = 0


def _id_bytes(id: str) -> bytes:
    raw = id.encode("ascii")
    return bytes((len(raw),)) + raw


def encode(kind: Kind, id: str, meta: Meta | None = None, env: bytes = b"") -> list[bytes]:
    """A record as the chunks to write one after the other (the envelope is not copied)."""
    parts = [_id_bytes(id)]
    if kind != Kind.REMOVE:
        assert meta is not None
        meta_bytes = encode_meta(meta)
        if kind == Kind.WRITE:
            parts.append(_U32.pack(len(meta_bytes)))
        parts.append(meta_bytes)
    if kind == Kind.WRITE:
        parts.append(env)
    length = sum(len(p) for p in parts)
    crc = zlib.crc32(bytes((kind,)))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [_HEADER.pack(_MAGIC, kind, length, crc), *parts]


def _envelope_offset(record_offset: int, id: str, meta_size: int) -> int:
    """Where the envelope of a ``WRITE`` record written at ``record_offset`` starts."""
    return record_offset + HEADER_SIZE + 1 + len(id) + _U32.size + meta_size


def _decode(kind: Kind, payload: memoryview, offset: int, size: int) -> Record:
    """The record ``payload`` holds; :class:`CorruptError` when its shape is wrong."""
    if not payload:
        raise CorruptError("record without an id")
    id_len = payload[0]
    try:
        id = bytes(payload[1 : 1 + id_len]).decode("ascii")
    except UnicodeDecodeError:
        raise CorruptError("record id is not ASCII") from None
    if len(id) != id_len or not is_valid_id(id):
        raise CorruptError("record has an invalid id")
    rest = payload[1 + id_len :]
    if kind == Kind.REMOVE:
        if rest:
            raise CorruptError("removal record too long")
        return Record(kind, id, offset, size)
    if kind == Kind.META:
        return Record(kind, id, offset, size, decode_meta(bytes(rest)))
    if len(rest) < _U32.size:
        raise CorruptError("write record truncated")
    (meta_size,) = _U32.unpack_from(rest)
    if _U32.size + meta_size > len(rest):
        raise CorruptError("write record's meta runs past its end")
    meta = decode_meta(bytes(rest[_U32.size : _U32.size + meta_size]))
    env_offset = _envelope_offset(offset, id, meta_size)
    return Record(kind, id, offset, size, meta, env_offset, offset + size - env_offset)


def _record_at(data: memoryview, pos: int) -> Record | None:
    """The good record at ``pos``, or ``None`` (short, bad magic, CRC or shape)."""
    if len(data) - pos < HEADER_SIZE:
        return None
    magic, kind, length, crc = _HEADER.unpack_from(data, pos)
    end = pos + HEADER_SIZE + length
    if magic != _MAGIC or kind not in Kind._value2member_map_ or length > MAX_PAYLOAD:
        return None
    if end > len(data):
        return None
    payload = data[pos + HEADER_SIZE : end]
    if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
        return None
    try:
        return _decode(Kind(kind), payload, pos, end - pos)
    except CorruptError:
        return None


@dataclass
class Scan:
    """What :func:`scan` found besides the records.

    :ivar bad: ``(start, end)`` of each damaged stretch followed by a good record.
    :ivar end: where the good data ends: the torn tail, if any, starts here.
    :ivar header_ok: whether the segment starts with :data:`SEGMENT_HEADER`.
    """

    bad: list[tuple[int, int]] = field(default_factory=list)
    end: int = 0
    header_ok: bool = True


def scan(data: bytes, found: Scan) -> Iterator[Record]:
    """The good records of a segment's bytes, in order; damage goes into ``found``."""
    view = memoryview(data)
    pos = len(SEGMENT_HEADER)
    head = bytes(view[:pos])
    if head != SEGMENT_HEADER:
        # Another version is never read; a damaged header costs only itself when records of
        # this format follow it.
        resume = None if head.startswith(_FORMAT) else _next_good(data, view, 0)
        if resume is None:
            found.header_ok = False
            found.end = 0
            return
        found.bad.append((0, resume))
        pos = resume
    found.end = pos
    while pos < len(view):
        record = _record_at(view, pos)
        if record is None:
            resume = _next_good(data, view, pos + 1)
            if resume is None:
                return  # the torn tail: found.end stays where the good data ends
            found.bad.append((pos, resume))
            pos = resume
            continue
        yield record
        pos = found.end = record.offset + record.size


def _next_good(data: bytes, view: memoryview, start: int) -> int | None:
    """The offset of the next good record at or after ``start``, if any."""
    pos = start
    while True:
        pos = data.find(_MAGIC, pos)
        if pos < 0:
            return None
        if _record_at(view, pos) is not None:
            return pos
        pos += 1
