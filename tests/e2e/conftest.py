"""Fixtures for end-to-end tests: the daemon as a process, a sink as its next hop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.daemon import DaemonProcess
from tests.integration.smtp.conftest import sink, sink_factory  # noqa: F401 - fixtures

DaemonFactory = Callable[..., Awaitable[DaemonProcess]]


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Start daemons with settings merged over the test defaults; all stopped afterwards."""
    started: list[DaemonProcess] = []

    async def make(settings: dict[str, Any] | None = None, *, start: bool = True) -> DaemonProcess:
        d = DaemonProcess(tmp_path, settings or {})
        started.append(d)
        return await d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None:
            await d.stop(timeout=60)
