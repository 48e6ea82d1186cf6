"""Test-wide settings and fixtures.

* hypothesis profiles: ``dev`` locally, ``ci`` when ``CI`` is set (or ``HYPOTHESIS_PROFILE``);
* a private redis-server and a private Redis Cluster (3 masters, 3 replicas) for the whole
  session, and a key prefix per test;
* a tiny real filesystem (tmpfs) for disk-full tests.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.redis_server import RedisClusterServers, RedisServer

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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A Redis Cluster on loopback (3 masters, 3 replicas, no persistence), started on first
    use and stopped by pid at the end; tests share it, each with its own key prefix. Tests
    that fail nodes over or move slots start clusters of their own."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so that tests on the shared server never meet."""
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, so that ENOSPC is the kernel's own."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
