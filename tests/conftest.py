"""Test-wide settings and fixtures.

* hypothesis profiles: ``dev`` locally, ``ci`` when ``CI`` is set (or ``HYPOTHESIS_PROFILE``);
* a private redis-server for the whole session, and a key prefix per test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.redis_server import RedisServer

# Stateful runs do real I/O (fsync), so no per-example deadline; sizes keep them to seconds.
settings.register_profile(
    "dev",
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


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
