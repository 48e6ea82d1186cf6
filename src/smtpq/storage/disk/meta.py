"""The ``.meta`` file of a disk queue message: its format and codec (pure, no I/O).

Format version 1 — one header line, then a JSON object (UTF-8), then a newline::

    smtpq-meta 1 <crc32 of the JSON bytes, 8 lowercase hex digits>\\n
    {"timestamp":1800000000.0,"attempts":0,"delivered":[],"held":false,"last_reply":null}\\n

``delivered`` holds recipient indexes into the list as first written; ``last_reply`` is null or
:meth:`~smtpq.reply.Reply.to_dict`. A reader rejects any other magic, version, checksum or shape
(:class:`CorruptError`: the entry is quarantined), so that a later format can never be misread
as this one. Nothing here is pickled: a copied queue directory cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field

from smtpq.reply import ReplyDict

__all__ = ["CorruptError", "Meta", "decode_meta", "encode_meta", "schedule_fields"]

_MAGIC = b"smtpq-meta"
_VERSION = 1
_HEADER = re.compile(rb"smtpq-meta (\d+) ([0-9a-f]{8})")
# One encoder for every meta: json.dumps with options makes a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class CorruptError(Exception):
    """A stored file cannot be trusted (truncated, unparseable, wrong version, inconsistent)."""


@dataclass(slots=True)
class Meta:
    """The mutable part of a message, as stored in its ``.meta`` file."""

    timestamp: float
    attempts: int = 0
    delivered: list[int] = field(default_factory=list)
    held: bool = False
    last_reply: ReplyDict | None = None

    # The changes the storage contract makes (the local storages apply them to the meta they
    # hold, then store it).

    def reschedule(self, timestamp: float, reply: ReplyDict | None) -> None:
        """A new next attempt time, and the reply that deferred the message, if given."""
        self.timestamp = float(timestamp)
        if reply is not None:
            self.last_reply = reply

    def count_attempt(self) -> int:
        """One more attempt; the new count."""
        self.attempts += 1
        return self.attempts

    def add_delivered(self, indexes: set[int]) -> None:
        """Recipients (indexes as first written) done, with those done before."""
        self.delivered = sorted(indexes.union(self.delivered))


def encode_meta(meta: Meta) -> bytes:
    """The bytes of a meta file holding ``meta``."""
    body = _ENCODER.encode(
        {
            "timestamp": meta.timestamp,
            "attempts": meta.attempts,
            "delivered": meta.delivered,
            "held": meta.held,
            "last_reply": meta.last_reply,
        }
    ).encode()
    return b"%s %d %08x\n%s\n" % (_MAGIC, _VERSION, zlib.crc32(body), body)


def decode_meta(data: bytes) -> Meta:
    """The meta a file holds; :class:`CorruptError` unless it is a whole, valid version 1."""
    head, sep, rest = data.partition(b"\n")
    match = _HEADER.fullmatch(head)
    if not sep or match is None:
        raise CorruptError("not an smtpq meta file (bad header)")
    if int(match[1]) != _VERSION:
        raise CorruptError(f"unsupported meta format version {int(match[1])}")
    if not rest.endswith(b"\n"):
        raise CorruptError("meta file truncated")
    body = rest[:-1]
    if zlib.crc32(body) != int(match[2], 16):
        raise CorruptError("meta checksum mismatch")
    try:
        obj = json.loads(body)
        ts, attempts, delivered = obj["timestamp"], obj["attempts"], obj["delivered"]
        held, reply = obj["held"], obj["last_reply"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptError(f"meta unreadable: {exc}") from exc
    if (
        not isinstance(ts, int | float)
        or isinstance(ts, bool)
        or not math.isfinite(ts)
        or type(attempts) is not int
        or attempts < 0
        or not isinstance(delivered, list)
        or not all(type(i) is int and i >= 0 for i in delivered)
        or type(held) is not bool
        or not (
            reply is None
            or (
                isinstance(reply, dict)
                and all(isinstance(v, str | bool | None) for v in reply.values())
            )
        )
    ):
        raise CorruptError("meta has wrong field types")
    return Meta(float(ts), attempts, delivered, held, reply)


# What load() needs of a meta file, where it is laid out as encode_meta writes it: one regex
# finds the next attempt time and the held flag once the checksum is verified, instead of
# parsing and checking the whole document (bench/RESULTS.md, "Figures moved from the code").
# Any other layout goes through decode_meta; the types inside last_reply are checked when the
# message is read.
_SCHEDULE_FIELDS = re.compile(
    rb'smtpq-meta 1 ([0-9a-f]{8})\n(\{"timestamp":(-?[0-9][0-9.eE+-]*),"attempts":[0-9]+,'
    rb'"delivered":\[[0-9,]*\],"held":(true|false),"last_reply":(?:null|\{.*\})\})\n',
    re.DOTALL,
)


def schedule_fields(data: bytes) -> tuple[float, bool]:
    """A meta file's next attempt time and held flag, quickly; :class:`CorruptError` exactly
    where :func:`decode_meta` raises it."""
    match = _SCHEDULE_FIELDS.fullmatch(data)
    if match is not None and zlib.crc32(match[2]) == int(match[1], 16):
        with contextlib.suppress(ValueError):
            timestamp = float(match[3])
            if math.isfinite(timestamp):
                return timestamp, match[4] == b"true"
    meta = decode_meta(data)
    return meta.timestamp, meta.held
