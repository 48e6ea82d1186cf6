"""Run ``smtpq serve`` as a real process for end-to-end tests."""

from __future__ import annotations

import asyncio
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


class DaemonProcess:
    """``smtpq serve -c FILE`` in a subprocess; stopped by its pid."""

    def __init__(self, tmp: Path, settings: dict[str, Any]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.queue_dir = tmp / "queue"
        base: dict[str, Any] = {
            "hostname": "mx.test.example",
            "edge": {"listen": [f"127.0.0.1:{self.port}"], "reverse_lookup": False},
            "storage": {"type": "disk", "path": str(self.queue_dir)},
            "retry": {"initial": 0.5, "factor": 1.0, "maximum": 0.5, "jitter": 0.0},
            "log_level": "info",
        }
        for key, value in settings.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        self.config = tmp / "smtpq.toml"
        write_config(self.config, base)
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

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

    async def cli(self, *args: str, input: str | None = None) -> tuple[int, str, str]:
        """Run ``smtpq ARGS -c FILE`` (in a thread: the sink shares this loop)."""

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                self.command(*args, "-c", str(self.config)),
                capture_output=True,
                text=True,
                input=input,
                timeout=60,
            )

        done = await asyncio.to_thread(run)
        return done.returncode, done.stdout, done.stderr
