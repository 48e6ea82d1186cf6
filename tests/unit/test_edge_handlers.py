"""The edge answers every event the server machine can give, each with its own answer.

(With aiosmtpd, hooks were found by name and a misspelt one silently answered ``250 OK``;
here the table is checked against the events themselves.)
"""

from __future__ import annotations

import smtpq.smtp as core
from smtpq.edge.session import HANDLERS
from smtpq.smtp import Event


def event_types() -> set[type[Event]]:
    """Every event the machine's package exports."""
    exported = (getattr(core, name) for name in core.__all__)
    return {e for e in exported if isinstance(e, type) and issubclass(e, Event) and e is not Event}


def test_every_event_has_a_handler() -> None:
    assert set(HANDLERS) == event_types()
    assert len(event_types()) == 15
