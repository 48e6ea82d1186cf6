"""Replaying a journal at start-up (blocking; run in the journal's thread).

Every segment is read oldest first and its good records replayed into an
:class:`~smtpq.storage.journal.index.Index`. Nothing stops the replay:

* a damaged stretch between good records (bit rot, a bad sector) is copied to the corrupt
  directory, logged and counted; the records around it count as usual;
* the *torn tail* of the newest segment — an append that a crash interrupted, never
  acknowledged since a write returns only after its flush — is copied there too (so that
  nothing is ever thrown away unseen), then cut off;
* a segment of another format (another version's header, or no record of this one) is moved
  there whole, while a damaged header before good records is a damaged stretch like any
  other; a segment that a crash left shorter than its header (created, never written) is
  deleted.

A damaged stretch is copied once, under a name made of its segment and offsets, so that a
restart does not copy it again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from smtpq.storage.journal.index import Index
from smtpq.storage.journal.records import SEGMENT_HEADER, Scan, scan
from smtpq.storage.journal.segments import SegmentFiles

__all__ = ["Recovered", "recover"]

log = logging.getLogger("smtpq.storage.journal")


@dataclass
class Recovered:
    """What a replay found: the index, and how much damage it set aside."""

    index: Index = field(default_factory=Index)
    corrupt: int = 0
    torn_tails: int = 0


def recover(files: SegmentFiles, *, repair: bool = True) -> Recovered:
    """Replay the journal in ``files``.

    :param repair: set the damage aside as the module says (and create the directories if
        missing). ``False`` only reads — for a listing beside a running daemon, whose newest
        segment may end in an append under way or begin without its header yet: such a
        reader must never cut, move or delete anything.
    """
    if repair:
        files.open()
    elif not os.path.isdir(files.path):
        return Recovered()
    found = Recovered()
    for number in files.numbers():
        try:
            data = files.read_all(number)
        except FileNotFoundError:  # deleted by the owner meanwhile (read-only)
            continue
        damage = Scan()
        for record in scan(data, damage):
            found.index.apply(number, record)
        if not damage.header_ok:
            found.corrupt += not SEGMENT_HEADER.startswith(data)
        else:
            found.index.grown(number, damage.end)
            found.corrupt += len(damage.bad)
            found.torn_tails += damage.end < len(data)
        if repair:
            _set_aside(files, number, data, damage)
    return found


def _set_aside(files: SegmentFiles, number: int, data: bytes, damage: Scan) -> None:
    """Copy a segment's damage to the corrupt directory, cut off its torn tail, or move it
    away whole when it is not a segment of this format."""
    name = os.path.basename(files.name(number))
    if not damage.header_ok:
        if SEGMENT_HEADER.startswith(data):
            files.delete(number)  # a crash while it was being created: it holds nothing
            return
        kept = files.keep_once(name, data)
        files.delete(number)
        log.error("journal %s: %s is not a journal segment, moved to %s", files.path, name, kept)
        return
    for start, end in damage.bad:
        kept = files.keep_once(f"{name}.{start}-{end}", data[start:end])
        log.error(
            "journal %s: %s damaged at bytes %d-%d, skipped (kept in %s)",
            files.path, name, start, end, kept,
        )  # fmt: skip
    if damage.end < len(data):
        kept = files.keep_once(f"{name}.{damage.end}-{len(data)}", data[damage.end :])
        files.truncate(number, damage.end)
        log.warning(
            "journal %s: %s ended in %d bytes of an interrupted write, cut off (kept in %s)",
            files.path, name, len(data) - damage.end, kept,
        )  # fmt: skip
