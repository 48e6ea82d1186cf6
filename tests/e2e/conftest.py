"""Fixtures for end-to-end tests: the daemon as a process, a sink as its next hop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.daemon import DaemonProcess
from tests.integration.smtp.conftest import sink, sink_factory, tls_files  # noqa: F401 - fixtures

DaemonFactory = Callable[..., Awaitable[DaemonProcess]]


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Start daemons with settings merged over the test defaults; all stopped afterwards.

    Each daemon has its config, log and queue in ``where`` (default: the test's directory).
    """
    started: list[DaemonProcess] = []

    async def make(
        settings: dict[str, Any] | None = None,
        *,
        start: bool = True,
        obey_permissions: bool = False,
        where: Path | None = None,
    ) -> DaemonProcess:
        d = DaemonProcess(where or tmp_path, settings or {}, obey_permissions=obey_permissions)
        started.append(d)
        return await d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None:
            await d.stop(timeout=60)
