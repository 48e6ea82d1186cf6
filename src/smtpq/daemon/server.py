"""``smtpq serve``: the edge, the queue and the relay of one MTA, wired from a Config.

With ``workers = N > 1`` the first process supervises N worker processes. Each worker listens on
the same addresses (SO_REUSEPORT: the kernel spreads connections among them). With disk storage
the queue directory is split into shards, ``shard-0``, ``shard-1``, ...; worker ``i`` owns the
shards ``i, i + N, ...``, so every message is stored, scheduled and delivered by exactly one
process, and a queue written by more workers than now run is still delivered. Each shard has its
own admin socket (``shard-K/admin.sock``). With Redis storage all workers share one queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from smtpq.backoff import DefaultBackoff
from smtpq.clock import Clock, SystemClock
from smtpq.daemon.admin import AdminServer
from smtpq.daemon.config import Config, ConfigError, parse_hostport
from smtpq.daemon.metrics import Metrics
from smtpq.edge.server import SmtpEdge
from smtpq.policy import AddMissingHeaders, AddReceivedHeader
from smtpq.queue import Queue
from smtpq.relay.base import Relay
from smtpq.relay.mx import MxSmtpRelay
from smtpq.relay.smtp import StaticSmtpRelay
from smtpq.storage.base import QueueStorage
from smtpq.storage.dict import DictStorage
from smtpq.storage.disk import DiskStorage
from smtpq.storage.redis import RedisStorage

__all__ = [
    "Daemon",
    "Shard",
    "build_queue",
    "build_relay",
    "build_storage",
    "open_offline_queue",
    "serve_forever",
    "shards",
]

log = logging.getLogger("smtpq.daemon")
WORKER_ENV = "SMTPQ_WORKER"


def configure_logging(level: str) -> None:
    """One line per event on standard error, with UTC times."""
    handler = logging.StreamHandler()
    formatter = logging.Formatter(
        "%(asctime)s smtpq[%(process)d] %(levelname)s %(name)s: %(message)s",
        "%Y-%m-%dT%H:%M:%SZ",
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every connection and command at INFO; our own events say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # The format uses neither the caller's file and line nor thread names: not collecting them
    # for every record is the logging HOWTO's own advice for a busy process.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


@dataclass(frozen=True)
class Shard:
    """One queue of the daemon: a disk shard, or the one shared (Redis) or memory queue."""

    index: int
    path: Path | None  # the shard's directory (disk storage only)
    admin_socket: Path


def shards(config: Config, worker: int | None = None, workers: int = 1) -> list[Shard]:
    """The queues of the daemon, or of one worker (``worker`` of ``workers``).

    For disk storage: every ``shard-K`` directory found (and the worker's own); worker ``i``
    owns the shards with ``K % workers == i``. Other storages have one queue.
    """
    root = Path(config.storage.path)
    if config.storage.type != "disk":
        return [Shard(0, None, config.admin_socket())]
    found = {int(p.name[6:]) for p in root.glob("shard-*") if p.name[6:].isdigit() and p.is_dir()}
    found |= {worker} if worker is not None else {0}
    chosen = sorted(k for k in found if worker is None or k % workers == worker)
    socket = config.admin.socket
    return [
        Shard(
            k,
            root / f"shard-{k}",
            Path(socket) if socket and k == 0 else root / f"shard-{k}" / "admin.sock",
        )
        for k in chosen
    ]


def build_storage(config: Config, shard: Shard) -> QueueStorage:
    """The storage the config names, for one shard (not yet loaded)."""
    settings = config.storage
    if settings.type == "memory":
        return DictStorage(lease_timeout=settings.lease_timeout)
    if settings.type == "redis":
        try:
            return RedisStorage.from_url(
                settings.url, prefix=settings.prefix, lease_timeout=settings.lease_timeout
            )
        except ValueError as exc:
            raise ConfigError(f"storage.url: {exc}") from None
    assert shard.path is not None
    try:
        shard.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create queue directory {shard.path}: {exc}") from None
    return DiskStorage(
        shard.path / "env",
        shard.path / "meta",
        lease_timeout=settings.lease_timeout,
        sync=settings.sync,  # type: ignore[arg-type]  # validated by the config
    )


def build_relay(config: Config) -> Relay:
    """The relay the config names: a smarthost, or MX routing (with the static routes)."""
    smtp = config.smtp
    if smtp.helo_name is None:
        smtp = replace(smtp, helo_name=config.hostname)
    if config.relay.type == "smarthost":
        assert config.relay.host is not None
        return StaticSmtpRelay(config.relay.host, config.relay.port, config=smtp)
    return MxSmtpRelay(config.mx, smtp)


def build_queue(config: Config, storage: QueueStorage, relay: Relay | None, clock: Clock) -> Queue:
    """The Queue with the daemon's backoff and the trace/missing-header policies."""
    t = config.retry
    backoff = DefaultBackoff(
        initial=t.initial, factor=t.factor, maximum=t.maximum, lifetime=t.lifetime,
        jitter=t.jitter, clock=clock,
    )  # fmt: skip
    return Queue(
        storage,
        relay,
        backoff=backoff,
        relay_pool=config.relay_pool,
        clock=clock,
        grace_period=config.grace_period,
        hostname=config.hostname,
        policies=[AddReceivedHeader(config.hostname), AddMissingHeaders(config.hostname)],
        delay_warnings=t.delay_warnings,
        lifetime=t.lifetime,
    )


@contextlib.asynccontextmanager
async def open_offline_queue(config: Config, shard: Shard) -> AsyncIterator[Queue]:
    """A relay-less Queue on a stored queue, for operator commands when no daemon runs.

    Not loaded here: a disk queue loads its schedule when an action first needs it, and a
    listing reads only what it lists.
    """
    storage = build_storage(config, shard)
    try:
        yield build_queue(config, storage, None, SystemClock())
    finally:
        await storage.close()


class Daemon:
    """One worker: edges + a queue per owned shard + relay + admin API, until :meth:`stop`."""

    def __init__(
        self, config: Config, *, worker: int = 0, workers: int = 1, clock: Clock | None = None
    ) -> None:
        self.config = config
        self.worker = worker
        self.workers = workers
        self.clock = clock or SystemClock()
        self._stop = asyncio.Event()
        #: Set once the edges listen (tests and supervisors wait for it).
        self.ready = asyncio.Event()

    def stop(self) -> None:
        """Ask the daemon to shut down gracefully."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until stopped: stop accepting, finish attempts within the grace period, exit."""
        config = self.config
        owned = shards(config, self.worker, self.workers)
        relay = build_relay(config)
        queues: list[Queue] = []
        admins: list[AdminServer] = []
        edges: list[SmtpEdge] = []
        registries: list[Metrics] = []
        loads: list[asyncio.Task[None]] = []
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(relay.close)
                for shard in owned:
                    storage = build_storage(config, shard)
                    stack.push_async_callback(storage.close)
                    # A disk queue's schedule loads in the background (a million messages are
                    # a million files to read): mail is accepted meanwhile, and the stored
                    # messages are delivered once it is loaded.
                    loads.append(asyncio.create_task(self._load(shard, storage)))
                    stack.callback(loads[-1].cancel)
                    queue = build_queue(config, storage, relay, self.clock)
                    metrics = Metrics(storage, self.clock)
                    registries.append(metrics)
                    queue.observers.append(metrics.observe)
                    tcp = None
                    if config.admin.listen and shard.index == 0:
                        tcp = parse_hostport(config.admin.listen, 8025)
                    admin = AdminServer(
                        queue, metrics, socket_path=shard.admin_socket, tcp=tcp,
                        token=config.admin.token,
                    )  # fmt: skip
                    await queue.start()
                    stack.push_async_callback(queue.stop)
                    await admin.start()
                    stack.push_async_callback(admin.stop)
                    queues.append(queue)
                    admins.append(admin)
                # The worker's own shard (the first it owns) takes the new mail.
                edge_config = replace(config.edge, reuse_port=self.workers > 1)
                for host, port in config.listen_addresses():
                    edge = SmtpEdge(queues[0], replace(edge_config, host=host, port=port))
                    registries[0].add_edge(edge)  # the edge's refusals, with its queue's metrics
                    edges.append(edge)
                    await edge.start()
                log.info("smtpq ready: listening on %s", ", ".join(config.listen))
                self.ready.set()
                await self._stop.wait()
                log.info("shutting down: refusing new connections, finishing attempts")
                for edge in edges:
                    await edge.stop(grace_period=min(10.0, config.grace_period))
                for task in loads:  # a load that failed stopped the daemon: say why
                    error = task.exception() if task.done() and not task.cancelled() else None
                    if error is not None:
                        raise error
        finally:
            log.info("smtpq stopped")

    async def _load(self, shard: Shard, storage: QueueStorage) -> None:
        """Load a queue's schedule (its first ``get_info``; a shared queue needs no loading,
        and nothing lists every message as ``load()`` would); stop the daemon if that fails."""
        try:
            info = await storage.get_info()
        except Exception:
            log.exception("queue %d cannot be loaded; stopping", shard.index)
            self.stop()
            raise
        log.info("queue %d loaded: %d messages", shard.index, info["size"])


def worker_from_env() -> tuple[int, int] | None:
    """``(worker, workers)`` when this process is a worker started by a supervisor."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, total = value.partition("/")
    return int(index), int(total)


def serve_forever(config: Config) -> int:
    """Run the daemon (or supervise its workers) until SIGTERM/SIGINT; the exit code."""
    configure_logging(config.log_level)
    role = worker_from_env()
    if role is None and config.workers > 1:
        return _supervise(config.workers)
    worker, workers = role or (0, 1)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    daemon = Daemon(config, worker=worker, workers=workers)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.run()

    try:
        asyncio.run(main())
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


def _supervise(workers: int) -> int:
    """Start the worker processes, pass SIGTERM/SIGINT on, and wait for all of them.

    When a worker exits on its own (it crashed), the others are stopped too and the exit code
    is non-zero, so that a service manager restarts the whole daemon.
    """
    children: list[subprocess.Popen[bytes]] = []
    command = [sys.executable, "-m", "smtpq.daemon.cli", *sys.argv[1:]]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(workers):
        env = dict(os.environ, **{WORKER_ENV: f"{index}/{workers}"})
        children.append(subprocess.Popen(command, env=env))
    log.info("supervising %d workers: %s", workers, " ".join(str(c.pid) for c in children))
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not stopping:
        failed = [c for c in children if c.poll() is not None]
        log.error(
            "worker %d exited with %s; stopping the others", failed[0].pid, failed[0].returncode
        )
        forward(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    return 0 if stopping and not any(codes) else max(1, *codes)
