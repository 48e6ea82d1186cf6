"""SIGKILL of a 2-worker daemon's supervisor, again and again, while mail flows: nothing
acknowledged is lost, and only messages in flight at a kill are ever delivered twice."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter

import aiosmtplib
import pytest

from tests.e2e.conftest import DaemonFactory
from tests.e2e.daemon import DaemonProcess, gone
from tests.helpers import until
from tests.integration.smtp.sink import Sink

KILLS = 20
_ID_TO = re.compile(r" id=(\S+) to=<([^>]+)>")
_REMOVED = re.compile(r" removed id=(\S+)")


class Sender:
    """Sends message after message (each to a recipient of its own), never one twice."""

    def __init__(self, daemon: DaemonProcess, concurrency: int = 4) -> None:
        self.daemon = daemon
        self.acked: set[str] = set()
        self.sent = 0
        self._next = 0
        self._stopping = False
        self._tasks = [asyncio.create_task(self._run()) for _ in range(concurrency)]

    async def _run(self) -> None:
        while not self._stopping:
            n, self._next = self._next, self._next + 1
            rcpt = f"m{n}@dest.example"
            message = f"Subject: {n}\r\nMessage-ID: <m{n}@origin.example>\r\n\r\nbody\r\n"
            try:
                errors, _ = await aiosmtplib.send(
                    message.encode(), sender="alice@origin.example", recipients=[rcpt],
                    hostname="127.0.0.1", port=self.daemon.port, start_tls=False, timeout=10,
                )  # fmt: skip
            except (aiosmtplib.SMTPException, OSError):
                await asyncio.sleep(0.05)  # the daemon is down (or was killed mid-message)
                continue
            finally:
                self.sent += 1
            if not errors:
                self.acked.add(rcpt)

    async def stop(self) -> None:
        """Let each sender finish the message it is sending (the client may turn a
        cancellation into an error it reports, so they are asked rather than cancelled)."""
        self._stopping = True
        await asyncio.gather(*self._tasks)


def settled(logs: str) -> set[str]:
    """The recipients whose delivery the daemon recorded (their message removed)."""
    rcpt_of = dict(_ID_TO.findall(logs))
    return {rcpt_of[id] for id in _REMOVED.findall(logs) if id in rcpt_of}


def history(rcpts: set[str], sink: Sink, logs: str, kills: list[float]) -> str:
    """When each of ``rcpts`` reached the sink, and what the daemon logged of it."""
    lines = [f"kills at {', '.join(f'{t:.3f}' for t in kills)}"]
    for rcpt in sorted(rcpts):
        arrivals = zip(sink.received, sink.arrived_at, strict=True)
        times = [f"{t:.3f}" for r, t in arrivals if rcpt in r.recipients]
        ids = {id for id, to in _ID_TO.findall(logs) if to == rcpt}
        lines.append(f"{rcpt} reached the sink at {', '.join(times)}")
        lines += [line for line in logs.splitlines() if any(id in line for id in ids)]
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["disk", "journal"])
async def test_supervisor_sigkill_loop_duplicates_only_what_was_in_flight(
    daemon_factory: DaemonFactory, sink: Sink, storage: str
) -> None:
    daemon = await daemon_factory(
        {
            "workers": 2,
            "storage": {"type": storage},
            "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
            "retry": {"initial": 0.5, "maximum": 0.5},
            "log_level": "debug",  # "removed id=...": the delivery is recorded
        }
    )
    sender = Sender(daemon)
    in_flight: Counter[str] = Counter()  # recipient -> kills at which it was in flight
    worst_exit = 0.0
    kills: list[float] = []  # loop times, as the sink's arrival times
    try:
        for kill in range(KILLS):
            await daemon.logged("all 2 workers ready", count=kill + 1)
            # Mail flows for a while that differs from kill to kill (each lands elsewhere).
            flowing = len(sink.received)
            await until(lambda: len(sink.received) > flowing + 5, timeout=60)  # noqa: B023
            await asyncio.sleep(0.1 + 0.25 * (kill % 5))
            workers = daemon.workers()
            assert len(workers) == 2
            os.kill(daemon.pid, signal.SIGKILL)
            killed = time.monotonic()
            kills.append(asyncio.get_running_loop().time())
            await gone(workers, timeout=5)
            worst_exit = max(worst_exit, time.monotonic() - killed)
            assert await daemon.stop() == -signal.SIGKILL
            # What the killed workers had sent is in once the sink has read each of their
            # connections to its end (a fixed pause was once too short on a busy machine).
            await until(lambda: all(p.transport is None for p in sink.protocols), timeout=30)
            received = {r.recipients[0] for r in sink.received}
            in_flight.update(received - settled(daemon.logs()))
            await daemon.start()
        await daemon.logged("all 2 workers ready", count=KILLS + 1)
    finally:
        await sender.stop()
    await until(lambda: sender.acked <= {r.recipients[0] for r in sink.received}, timeout=120)
    await asyncio.sleep(2)  # time for any further copy to arrive
    assert await daemon.stop(signal.SIGTERM) == 0
    copies = Counter(r.recipients[0] for r in sink.received)
    duplicated = {rcpt for rcpt, n in copies.items() if n > 1}
    never_in_flight = {rcpt for rcpt in duplicated if rcpt not in in_flight}
    beyond_bound = {rcpt for rcpt in duplicated if copies[rcpt] > 1 + in_flight[rcpt]}
    print(
        f"\nkills={KILLS} attempts={sender.sent} acked={len(sender.acked)} "
        f"delivered={len(copies)} copies={sum(copies.values())} duplicated={len(duplicated)} "
        f"in-flight-at-a-kill={len(in_flight)} duplicated-never-in-flight={len(never_in_flight)} "
        f"slowest-worker-exit={worst_exit:.3f}s"
    )
    assert sender.acked <= set(copies), "an acknowledged message was lost"
    assert never_in_flight == set(), history(never_in_flight, sink, daemon.logs(), kills)
    assert beyond_bound == set()
    assert len(sender.acked) > KILLS * 5
