"""The journal's index: every live message, where its envelope lies, and what each segment
still holds (pure, no I/O).

Replaying a journal's records in order into an :class:`Index` gives the queue; the running
storage keeps the same index up to date as it appends. Per segment it counts the live
messages whose ``WRITE`` record lies there and their bytes, which says when a segment can go
(:meth:`Index.deletable`) and when its messages are worth moving (:meth:`Index.to_compact`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from smtpq.storage.disk.meta import Meta
from smtpq.storage.journal.records import Kind, Record

__all__ = ["Entry", "Index"]


@dataclass(slots=True)
class Entry:
    """A live message: its state and where its envelope is.

    :ivar size: bytes of its ``WRITE`` record (what it keeps alive in its segment).
    """

    meta: Meta
    segment: int
    env_offset: int
    env_size: int
    size: int


class Index:
    """The live messages of a journal, and the live bytes of each segment."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        #: segment -> ids of the live messages whose WRITE record is there.
        self.by_segment: defaultdict[int, set[str]] = defaultdict(set)
        #: segment -> bytes of those records.
        self.live_bytes: defaultdict[int, int] = defaultdict(int)
        #: segment -> bytes of the segment file (as far as this index knows it).
        self.segment_bytes: dict[int, int] = {}
        #: Bytes of every segment, and of the records that keep a live message (kept up to
        #: date as they change: they are read after every append).
        self.total_bytes = 0
        self.total_live = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, id: object) -> bool:
        return id in self.entries

    def get(self, id: str) -> Entry | None:
        """The entry of ``id``, if live."""
        return self.entries.get(id)

    def put(self, id: str, entry: Entry) -> None:
        """``id`` is live at ``entry`` (replacing where it was)."""
        self._forget(id)
        self.entries[id] = entry
        self.by_segment[entry.segment].add(id)
        self.live_bytes[entry.segment] += entry.size
        self.total_live += entry.size

    def remove(self, id: str) -> Entry | None:
        """``id`` is gone; its entry, if it was live."""
        entry = self._forget(id)
        if entry is not None:
            del self.entries[id]
        return entry

    def _forget(self, id: str) -> Entry | None:
        entry = self.entries.get(id)
        if entry is not None:
            ids = self.by_segment[entry.segment]
            ids.discard(id)
            self.live_bytes[entry.segment] -= entry.size
            self.total_live -= entry.size
            if not ids:
                del self.by_segment[entry.segment]
                del self.live_bytes[entry.segment]
        return entry

    def apply(self, segment: int, record: Record) -> None:
        """Replay one record read from ``segment``. A state change or removal of a message not
        in the index (its segment deleted, or its write damaged) changes nothing."""
        if record.kind == Kind.WRITE:
            assert record.meta is not None
            self.put(
                record.id,
                Entry(record.meta, segment, record.env_offset, record.env_size, record.size),
            )
        elif record.kind == Kind.META:
            entry = self.entries.get(record.id)
            if entry is not None and record.meta is not None:
                entry.meta = record.meta
        else:
            self.remove(record.id)

    def grown(self, segment: int, size: int) -> None:
        """Segment ``segment`` now holds ``size`` bytes."""
        self.total_bytes += size - self.segment_bytes.get(segment, 0)
        self.segment_bytes[segment] = size

    def dropped(self, segment: int) -> None:
        """Segment ``segment`` was deleted."""
        self.total_bytes -= self.segment_bytes.pop(segment, 0)

    def oldest(self, active: int | None) -> int | None:
        """The oldest segment other than ``active``, if there is one."""
        return min((s for s in self.segment_bytes if s != active), default=None)

    def deletable(self, active: int | None) -> int | None:
        """The oldest segment, when it is not the active one and holds no live message.

        Only the oldest may go: a newer segment can hold the removals of messages written in
        an older one, which would come back if it were deleted first.
        """
        oldest = self.oldest(active)
        if oldest is not None and oldest not in self.by_segment:
            return oldest
        return None

    def to_compact(self, active: int | None, slack: int) -> int | None:
        """The oldest segment, when its live messages should move to the active one: it is
        mostly dead, or the journal holds more than twice its live data plus ``slack`` bytes
        (so that a few long-deferred messages cannot keep every later segment on disk)."""
        oldest = self.oldest(active)
        if oldest is None or oldest not in self.by_segment:
            return None
        size = self.segment_bytes.get(oldest, 0)
        if 2 * self.live_bytes[oldest] < size or self.total_bytes > 2 * self.total_live + slack:
            return oldest
        return None
