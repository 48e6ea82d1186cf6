"""Shared test helpers: a scriptable relay, and waiting for conditions without fixed sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from smtpq.envelope import Envelope
from smtpq.relay.base import Relay, RelayError, RelayResult
from smtpq.reply import Reply


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until ``condition()`` holds; fail (not hang) after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polls a plain predicate
            await asyncio.sleep(0.001)


Script = Callable[[str, int], Reply | RelayError | None]


class ScriptedRelay(Relay):
    """A relay whose answer per recipient and attempt number comes from a script.

    Every call is recorded as (recipients, attempts); ``delivered`` lists each recipient each
    time it was reported delivered, so duplicates show.
    """

    def __init__(self, script: Script | None = None) -> None:
        self.script: Script = script or (lambda rcpt, n: None)
        self.calls: list[tuple[list[str], int]] = []
        self.delivered: list[str] = []
        self.envelopes: list[Envelope] = []

    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        """Answer each recipient as the script says."""
        self.calls.append((list(envelope.recipients), attempts))
        self.envelopes.append(envelope)
        results: dict[str, Reply | RelayError | None] = {}
        for rcpt in envelope.recipients:
            outcome = self.script(rcpt, attempts)
            results[rcpt] = outcome
            if outcome is None or (isinstance(outcome, Reply) and outcome.is_success()):
                self.delivered.append(rcpt)
        return results

    def attempts_for(self, rcpt: str) -> int:
        """How many attempts included ``rcpt``."""
        return sum(1 for rcpts, _ in self.calls if rcpt in rcpts)


def make_envelope(
    sender: str = "sender@example.org",
    recipients: Sequence[str] = ("rcpt@example.com",),
    body: bytes = b"Hello.\r\n",
) -> Envelope:
    """A small message."""
    env = Envelope(sender, list(recipients))
    env.parse(b"From: <" + sender.encode() + b">\r\nSubject: test\r\n\r\n" + body)
    return env
