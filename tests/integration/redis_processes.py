"""Queue processes over Redis for the multi-process tests: ``redis_worker.py`` workers and edges,
started and stopped by pid, and what they recorded."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from smtpq.storage import RedisStorage

__all__ = ["Processes", "delivered", "lines", "queue_size", "until"]

ROOT = Path(__file__).resolve().parents[2]


class Processes:
    """The processes a test started, stopped by pid at the end whatever happens."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Run ``redis_worker`` with ``args``; a worker is returned once it says ``ready``."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.redis_worker", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.started.append(proc)
        if args[0] == "worker":
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        return proc

    def stop(self, proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
        """Signal ``proc`` by its pid and wait for it; its exit status."""
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=30)

    def stop_all(self) -> None:
        """Stop whatever still runs (SIGTERM, then SIGKILL)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def lines(path: Path) -> list[str]:
    """The complete lines of a file that other processes append to."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (other processes do the work) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def queue_size(url: str, prefix: str, cluster: bool = False) -> int:
    """Messages still stored under ``prefix``, over every shard."""

    async def size() -> int:
        store = RedisStorage.from_url(url, prefix=prefix, cluster=cluster)
        try:
            return int((await store.get_info())["size"])
        finally:
            await store.close()

    return asyncio.run(size())


def delivered(record: Path) -> collections.Counter[str]:
    """How many times each sender's message was delivered."""
    return collections.Counter(line.split()[0] for line in lines(record))
