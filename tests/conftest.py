"""Fixtures shared by every test directory: a private redis-server for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, without persistence, stopped by pid at the end.

    Tests share it: each one uses its own key prefix (see ``redis_prefix``).
    """
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so that tests on the shared server never meet."""
    return f"test-{uuid.uuid4().hex[:12]}:"
