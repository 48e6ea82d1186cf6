"""Which recipients the edge accepts, from whom (:class:`RecipientRules`), and the recipient map.

The recipient map says which addresses in the relay domains exist (Postfix's
``relay_recipient_maps``), so that an unknown one is refused at RCPT with ``550 5.1.1`` instead
of being accepted and bounced later to a sender that may be forged (backscatter). Its file has
one entry per line: an address (``user@example.org``), or ``@example.org`` for every address of
a domain; ``#`` starts a comment, and anything after the first word of a line is ignored (a
Postfix map's right-hand side may be kept). Entries are compared without case. Pure, but for
reading the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

from smtpq.edge.access import RelayDecision, RelayPolicy
from smtpq.reply import Replies, Reply, relay_denied_reply, unknown_recipient_reply

__all__ = ["RecipientMap", "RecipientRules", "Verdict"]

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


class Verdict(NamedTuple):
    """What :meth:`RecipientRules.check` makes of a recipient.

    :ivar address: the address to deliver to (``<postmaster>`` made whole).
    :ivar refusal: the reply refusing it, or None.
    :ivar reason: the refusal's reason for the metrics (``relay_denied``, ``untrusted_routing``,
        ``unknown_recipient``), or None.
    """

    address: str
    refusal: Reply | None = None
    reason: str | None = None


class RecipientRules:
    """The relay rule, the recipient map (if any) and ``<postmaster>``, for one RCPT.

    :param postmaster: the address mail to ``<postmaster>`` goes to: RFC 5321 §4.5.1 has every
        server accept that recipient, without a domain, from anyone.
    """

    def __init__(self, relay: RelayPolicy, known: RecipientMap | None, postmaster: str) -> None:
        self.relay = relay
        self.known = known
        self.postmaster = postmaster

    def check(self, address: str, ip: str | None, authenticated: bool) -> Verdict:
        """Whether a client (at ``ip``, authenticated or not) may send to ``address``."""
        _, at, domain = address.rpartition("@")
        if not at:
            if address.lower() == "postmaster":
                return Verdict(self.postmaster)
            return Verdict(address, Replies.NO_DOMAIN)
        decision = self.relay.decide(address, ip, authenticated)
        if decision is not RelayDecision.ALLOWED:
            return Verdict(address, relay_denied_reply(address), decision.value)
        known = self.known
        if known is not None and address not in known and self.relay.domain_accepted(domain):
            return Verdict(address, unknown_recipient_reply(address), "unknown_recipient")
        return Verdict(address)
