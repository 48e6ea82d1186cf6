"""The recipient map: which addresses in the relay domains exist (Postfix's
``relay_recipient_maps``), so that an unknown one is refused at RCPT with ``550 5.1.1`` instead
of being accepted and bounced later to a sender that may be forged (backscatter).

The file has one entry per line: an address (``user@example.org``), or ``@example.org`` for
every address of a domain; ``#`` starts a comment, and anything after the first word of a line
is ignored (a Postfix map's right-hand side may be kept). Entries are compared without case.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["RecipientMap"]

log = logging.getLogger("smtpq.edge")


class RecipientMap:
    """The known recipients, read once from a file (:meth:`load`); a new map is made to
    re-read it (``SmtpEdge.reconfigure``, on SIGHUP in the daemon)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: frozenset[str]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RecipientMap:
        """Read the map. OSError if the file cannot be read; a malformed line is logged and
        skipped."""
        entries: set[str] = set()
        text = Path(path).read_text("utf-8", errors="replace")
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            entry = line.split()[0].lower()
            local, at, domain = entry.rpartition("@")
            if not at or not domain or (local and local.startswith("@")):
                log.warning("%s:%d: not an address or @domain; ignored", path, number)
                continue
            entries.add(entry)
        return cls(frozenset(entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` is listed, itself or by its domain (``@domain``)."""
        if not isinstance(address, str):
            return False
        address = address.lower()
        _, at, domain = address.rpartition("@")
        return address in self._entries or (bool(at) and "@" + domain in self._entries)
