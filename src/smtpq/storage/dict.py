"""DictStorage: the queue in plain mappings (memory for tests, shelve for basic persistence)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, MutableMapping, Sequence
from typing import Any

from smtpq.envelope import Envelope
from smtpq.errors import MessageGone
from smtpq.reply import Reply
from smtpq.storage.base import StoredMessage, new_id
from smtpq.storage.schedule import LocallyScheduled, LocalSchedule

__all__ = ["DictStorage"]


class DictStorage(LocallyScheduled):
    """A queue kept in two mappings.

    :param envelope_db: id -> serialised envelope bytes (a new dict by default).
    :param meta_db: id -> plain dict (timestamp, attempts, delivered, held, last_reply).

    Only bytes and plain values are stored, so ``shelve`` objects work as the mappings. shelve
    pickles what it stores: use it for trusted local files only. Every change is assigned back
    (and ``sync()``-ed when the mapping has it). Envelopes are stored serialised, so the relay
    never shares the stored object.
    """

    def __init__(
        self,
        envelope_db: MutableMapping[str, Any] | None = None,
        meta_db: MutableMapping[str, Any] | None = None,
        *,
        lease_timeout: float = 60.0,
    ) -> None:
        self.env_db: MutableMapping[str, Any] = {} if envelope_db is None else envelope_db
        self.meta_db: MutableMapping[str, Any] = {} if meta_db is None else meta_db
        self.lease_timeout = lease_timeout
        self._schedule = LocalSchedule()
        self._loaded = False

    def _sync(self) -> None:
        for db in (self.env_db, self.meta_db):
            sync = getattr(db, "sync", None)
            if sync is not None:
                sync()

    def _meta(self, id: str) -> dict[str, Any]:
        try:
            return dict(self.meta_db[id])
        except KeyError:
            raise MessageGone(id) from None

    def _put_meta(self, id: str, meta: dict[str, Any]) -> None:
        self.meta_db[id] = meta
        self._sync()

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            await self.load()

    # -- records -------------------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        """Store a copy of the envelope; see :meth:`QueueStorage.write`."""
        await self._ensure_loaded()
        id = new_id(timestamp)
        self.env_db[id] = envelope.to_bytes()
        meta = {"timestamp": timestamp, "attempts": 0, "delivered": [], "held": False}
        self._put_meta(id, meta)
        lease = timestamp + self.lease_timeout if claimed else None
        self._schedule.add(id, timestamp, lease_until=lease)
        return id

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        """See :meth:`QueueStorage.set_timestamp`."""
        meta = self._meta(id)
        meta["timestamp"] = timestamp
        if last_reply is not None:
            meta["last_reply"] = last_reply.to_dict()
        self._put_meta(id, meta)
        self._schedule.reschedule(id, timestamp)

    async def increment_attempts(self, id: str) -> int:
        """See :meth:`QueueStorage.increment_attempts`."""
        meta = self._meta(id)
        meta["attempts"] = int(meta["attempts"]) + 1
        self._put_meta(id, meta)
        return int(meta["attempts"])

    async def set_recipients_delivered(self, id: str, indexes: Iterable[int]) -> None:
        """See :meth:`QueueStorage.set_recipients_delivered`."""
        meta = self._meta(id)
        meta["delivered"] = sorted(set(meta["delivered"]).union(indexes))
        self._put_meta(id, meta)

    async def load(self) -> list[tuple[float, str]]:
        """Every message as ``(timestamp, id)``; rebuilds the in-memory schedule."""
        self._loaded = True
        # Keep the leases this object holds: a reload must not hand an attempt to a second worker.
        leases = self._schedule.leases()
        self._schedule.clear()
        result: list[tuple[float, str]] = []
        for id in list(self.meta_db):
            try:
                meta = self.meta_db[id]
            except KeyError:
                continue  # removed meanwhile
            if id not in self.env_db:
                continue
            ts = float(meta["timestamp"])
            held = bool(meta.get("held"))
            self._schedule.add(id, ts, held=held, lease_until=leases.get(id))
            result.append((ts, id))
        return result

    async def iter_ids(self, page: int = 500) -> AsyncIterator[list[str]]:
        """See :meth:`QueueStorage.iter_ids`: pages of the schedule's ids."""
        await self._ensure_loaded()
        async for ids in self._schedule.pages(page):
            yield ids

    async def get_entry(self, id: str) -> StoredMessage:
        """See :meth:`QueueStorage.get_entry`."""
        meta = self._meta(id)
        try:
            data = self.env_db[id]
        except KeyError:
            raise MessageGone(id) from None
        reply = meta.get("last_reply")
        return StoredMessage.from_written(
            id,
            Envelope.from_bytes(data),
            meta["delivered"],
            attempts=int(meta["attempts"]),
            timestamp=float(meta["timestamp"]),
            held=bool(meta.get("held")),
            last_reply=Reply.from_dict(reply) if reply else None,
        )

    async def remove(self, id: str) -> None:
        """See :meth:`QueueStorage.remove`."""
        self.meta_db.pop(id, None)
        self.env_db.pop(id, None)
        self._sync()
        self._schedule.discard(id)

    async def get_info(self) -> dict[str, Any]:
        """``size`` (messages stored), ``held``, ``active`` (being attempted), ``oldest``."""
        await self._ensure_loaded()
        return {"size": len(self.meta_db), **self._schedule.stats()}

    async def close(self) -> None:
        """Close shelve objects (plain dicts need nothing)."""
        for db in (self.env_db, self.meta_db):
            close = getattr(db, "close", None)
            if close is not None:
                close()

    # -- schedule ------------------------------------------------------------------------------

    async def flush(self, now: float, ids: Sequence[str] | None = None) -> int:
        """See :meth:`QueueStorage.flush`; the new time is kept in memory only."""
        await self._ensure_loaded()
        return len(self._schedule.flush(now, ids))

    async def set_held(self, id: str, held: bool) -> None:
        """See :meth:`QueueStorage.set_held`."""
        await self._ensure_loaded()
        meta = self._meta(id)
        meta["held"] = held
        self._put_meta(id, meta)
        self._schedule.hold(id, held)
