"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.redis_processes import Processes


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Start Queue processes; all are stopped by pid when the test ends."""
    p = Processes()
    yield p
    p.stop_all()
