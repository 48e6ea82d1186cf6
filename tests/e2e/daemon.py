"""Run ``smtpq serve`` as a real process for end-to-end tests."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.smtp.conftest import free_port


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, number or list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_config(path: Path, settings: dict[str, Any]) -> None:
    """Write nested dicts as TOML tables (one level)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for section, table in settings.items():
        if isinstance(table, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{toml_value(k)} = {toml_value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")


_PR_CAPBSET_DROP = 24
# CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: without them root obeys file permissions.
_DAC_CAPABILITIES = (1, 2)


def obey_file_permissions() -> None:
    """In a child before exec: drop the capabilities that let root ignore file permissions,
    so that a test run as root sees the "permission denied" an unprivileged daemon would."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _DAC_CAPABILITIES:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether any thread of process ``pid`` still runs (a zombie is dead).

    Each thread counts: a killed process's main thread may be a zombie while others are
    still exiting, and its descriptors (its locks) are closed only when the last one is.
    """
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            return True
    return False


async def gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` is alive; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110 - polls /proc
            await asyncio.sleep(0.005)


class DaemonProcess:
    """``smtpq serve -c FILE`` in a subprocess; stopped by its pid.

    :param obey_permissions: run it without root's power over file permissions.
    """

    def __init__(
        self, tmp: Path, settings: dict[str, Any], *, obey_permissions: bool = False
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.queue_dir = tmp / "queue"
        self.obey_permissions = obey_permissions
        base: dict[str, Any] = {
            "hostname": "mx.test.example",
            "edge": {"listen": [f"127.0.0.1:{self.port}"], "reverse_lookup": False},
            "storage": {"type": "disk", "path": str(self.queue_dir)},
            "retry": {"initial": 0.5, "factor": 1.0, "maximum": 0.5, "jitter": 0.0},
            "log_level": "info",
            "workers": 1,  # the default is one per core: tests that want more say so
        }
        self.settings = base
        self.config = tmp / "smtpq.toml"
        self.rewrite(settings)
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def rewrite(self, settings: dict[str, Any]) -> None:
        """Merge ``settings`` (tables merged one level deep) into the config file."""
        for key, value in settings.items():
            if isinstance(value, dict) and isinstance(self.settings.get(key), dict):
                self.settings[key] = {**self.settings[key], **value}
            else:
                self.settings[key] = value
        write_config(self.config, self.settings)

    def command(self, *args: str) -> list[str]:
        """The smtpq command line with this daemon's config."""
        return [sys.executable, "-m", "smtpq.daemon.cli", *args]

    async def start(self, timeout: float = 20.0) -> DaemonProcess:
        """Start and wait until the SMTP port accepts connections."""
        # A short, one-off spawn: blocking is harmless here and keeps the pid ours to signal.
        with open(self.log, "ab") as log:  # noqa: ASYNC230
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                self.command("serve", "-c", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=obey_file_permissions if self.obey_permissions else None,
            )
        return await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 20.0) -> DaemonProcess:
        """Wait until the SMTP port of the started process accepts connections."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return self

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to the daemon's pid and wait for it to exit; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:  # noqa: ASYNC110 - polls a child process
                await asyncio.sleep(0.05)
        return self.proc.returncode

    def logs(self) -> str:
        """What the daemon logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def logged(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears ``count`` times in the log."""
        async with asyncio.timeout(timeout):
            while self.logs().count(text) < count:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
                await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        """The daemon's (the supervisor's) pid."""
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        """The pids of the daemon's worker processes."""
        return children(self.pid)

    async def cli(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        """Run ``smtpq ARGS -c FILE`` (in a thread: the sink shares this loop)."""

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                self.command(*args, "-c", str(self.config)),
                capture_output=True,
                text=True,
                input=input,
                timeout=60,
                env={**os.environ, **(env or {})},
                preexec_fn=obey_file_permissions if self.obey_permissions else None,
            )

        done = await asyncio.to_thread(run)
        return done.returncode, done.stdout, done.stderr
