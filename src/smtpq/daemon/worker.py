"""One process of ``smtpq serve``: edges, a queue per owned shard, the relay and the admin API.

A :class:`Daemon` runs until SIGTERM/SIGINT (stop accepting, finish attempts within the grace
period, exit 0) and reloads its configuration on SIGHUP (:mod:`smtpq.daemon.reload` says what
changes live). With ``workers = 1`` it is the whole daemon; with more, a supervisor
(:mod:`smtpq.daemon.supervisor`) starts each worker process running :func:`main`, with a
:class:`WorkerSpec` on standard input: its index, the supervisor's effective configuration,
where to read the configuration again, and the descriptors of its shards' locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from smtpq.clock import Clock, SystemClock
from smtpq.daemon.admin import AdminServer
from smtpq.daemon.config import Config, ConfigError, ConfigSource, build_config, parse_hostport
from smtpq.daemon.destinations import destination_policy, destination_setup
from smtpq.daemon.errors import StartupError
from smtpq.daemon.logs import configure_logging
from smtpq.daemon.metrics import Metrics
from smtpq.daemon.reload import RELAY_SECTIONS, plan_reload
from smtpq.daemon.server import (
    ReloadableRelay,
    Shard,
    build_backoff,
    build_queue,
    build_relay,
    build_storage,
    shard_at,
)
from smtpq.edge.server import SmtpEdge
from smtpq.queue import Queue
from smtpq.queue.rules import RetryRules
from smtpq.storage.base import QueueStorage
from smtpq.storage.lock import ShardLock, ShardLocked

__all__ = ["Daemon", "WorkerSpec", "main", "run_daemon"]

log = logging.getLogger(__name__)

#: What a Daemon tells its supervisor or service manager: "ready", "reloading", "reloaded",
#: "stopping".
EventSink = Callable[[str], None]


class Daemon:
    """One worker: edges + a queue per owned shard + relay + admin API, until :meth:`stop`.

    :param owned: the shards this process serves (their locks are the caller's business).
    :param workers: how many processes serve the daemon (more than one: SO_REUSEPORT).
    :param source: where :meth:`reload` reads the configuration again.
    :param events: told of each state change (readiness for a supervisor or systemd).
    :param admin: serve the admin API (a queue that workers share has one, in worker 0).
    """

    def __init__(
        self,
        config: Config,
        owned: Sequence[Shard],
        *,
        workers: int = 1,
        source: ConfigSource | None = None,
        clock: Clock | None = None,
        events: EventSink | None = None,
        admin: bool = True,
    ) -> None:
        self.config = config
        self.admin = admin
        self.owned = list(owned)
        self.workers = workers
        self.source = source or ConfigSource()
        self.clock = clock or SystemClock()
        self.events = events or (lambda event: None)
        #: Set when a queue could not be loaded: the process exits with code 2.
        self.failed = False
        #: Set once everything listens (tests and supervisors wait for it).
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()
        self.relay: ReloadableRelay | None = None
        self.queues: list[Queue] = []
        self.edges: list[SmtpEdge] = []

    def stop(self) -> None:
        """Ask the daemon to shut down gracefully."""
        self._stop.set()

    async def run(self) -> None:
        """Start (StartupError if anything cannot be had), serve until stopped, then stop
        accepting and finish attempts within the grace period."""
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack)
            log.info("smtpq ready: listening on %s", ", ".join(self.config.listen))
            self.ready.set()
            self.events("ready")
            await self._stop.wait()
            log.info("shutting down: refusing new connections, finishing attempts")
            self.events("stopping")
            for edge in self.edges:
                await edge.stop(grace_period=min(10.0, self.config.grace_period))
        log.info("smtpq stopped")

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        self.relay = relay = ReloadableRelay(build_relay(config))
        stack.push_async_callback(relay.close)
        destinations = destination_setup(config, self.workers)
        stack.push_async_callback(destinations[1].close)
        admins: list[AdminServer] = []
        registries: list[Metrics] = []
        for shard in self.owned:
            storage = build_storage(config, shard)
            stack.push_async_callback(storage.close)
            queue = build_queue(config, storage, relay, self.clock, destinations)
            metrics = Metrics(storage, self.clock, destinations=queue.destination_views)
            registries.append(metrics)
            queue.observers.append(metrics.observe)
            tcp = None
            if config.admin.listen and shard.index == 0:
                tcp = parse_hostport(config.admin.listen, 8025)
            if self.admin:
                token = config.admin.token
                api = AdminServer(
                    queue, metrics, socket_path=shard.admin_socket, tcp=tcp, token=token
                )
                admins.append(api)
            self.queues.append(queue)
        for admin in admins:
            try:
                await admin.start()
            except OSError as exc:
                names = [str(admin.socket_path), *([str(config.admin.listen)] if admin.tcp else [])]
                reason = exc.strerror or exc
                raise StartupError(
                    f"cannot start the admin API on {' and '.join(names)}: {reason}"
                ) from None
            stack.push_async_callback(admin.stop)
        for shard, queue in zip(self.owned, self.queues, strict=True):
            await queue.start()
            stack.push_async_callback(queue.stop)
            # A disk queue's schedule loads in the background (a million messages are a
            # million files to read): mail is accepted meanwhile, and the stored messages are
            # delivered once it is loaded.
            task = asyncio.create_task(self._load(shard, queue.store))
            stack.callback(task.cancel)
        # The worker's own shard (the first it owns) takes the new mail.
        edge_config = replace(config.edge, reuse_port=self.workers > 1)
        for host, port in config.listen_addresses():
            edge = SmtpEdge(self.queues[0], replace(edge_config, host=host, port=port))
            registries[0].add_edge(edge)  # the edge's refusals, with its queue's metrics
            stack.push_async_callback(edge.stop)
            try:
                await edge.start()
            except OSError as exc:
                where = config.listen[len(self.edges)]
                raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from None
            self.edges.append(edge)

    async def _load(self, shard: Shard, storage: QueueStorage) -> None:
        """Load a queue's schedule (its first ``get_info``; a shared queue needs no loading,
        and nothing lists every message as ``load()`` would); stop the daemon if that fails."""
        try:
            info = await storage.get_info()
        except Exception as exc:
            log.error("queue %d cannot be loaded: %s; stopping", shard.index, exc)
            self.failed = True
            self.stop()
            return
        log.info("queue %d loaded: %d messages", shard.index, info["size"])

    def reload(self) -> None:
        """Read the configuration again and apply what can change live (SIGHUP)."""
        task = asyncio.get_running_loop().create_task(self._reload())
        # Keep a reference until it is done (the loop holds only a weak one).
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        await self.ready.wait()
        async with self._reload_lock:
            self.events("reloading")
            try:
                await self._apply_new_config()
            except Exception:  # a reload never takes the daemon down
                log.exception("reload failed; running on with the configuration it had")
            finally:
                self.events("reloaded")

    async def _apply_new_config(self) -> None:
        try:
            new = await asyncio.to_thread(self.source.load)
        except ConfigError as exc:
            log.error("reload failed: configuration error: %s; running on unchanged", exc)
            return
        plan = plan_reload(self.config, new)
        config = plan.config
        try:
            for edge in self.edges:  # TLS and credentials files are read again in any case
                edge.reconfigure(config.edge)
        except (OSError, ValueError) as exc:
            log.error("reload failed: edge: %s; running on unchanged", exc)
            return
        if self.relay is not None and any(plan.changes(s) for s in RELAY_SECTIONS):
            self.relay.replace(build_relay(config))
        for queue in self.queues:
            if plan.changes("retry"):
                queue.backoff = build_backoff(config, self.clock)
                queue.rules = RetryRules(config.retry.delay_warnings, config.retry.lifetime)
            if plan.changes("destinations"):
                queue.set_destination_policy(destination_policy(config, self.workers))
            queue.grace_period = config.grace_period
        configure_logging(config.log_level, config.log_format)
        self.config = config
        applied = ", ".join(plan.live) or "no setting changed"
        log.info("configuration reloaded: %s (TLS and credentials files read again)", applied)
        if plan.restart:
            log.warning(
                "configuration: %s changed; that needs a restart (running on with the old value)",
                ", ".join(plan.restart),
            )


def run_daemon(
    config: Config,
    owned: Sequence[Shard],
    *,
    workers: int = 1,
    source: ConfigSource | None = None,
    events: EventSink | None = None,
    admin: bool = True,
) -> int:
    """Run a :class:`Daemon` in this process until SIGTERM/SIGINT; the exit code.

    A start-up failure is one line on standard error and exit code 2.
    """
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> Daemon:
        daemon = Daemon(config, owned, workers=workers, source=source, events=events, admin=admin)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload)
        await daemon.run()
        return daemon

    try:
        daemon = asyncio.run(main())
    except StartupError as exc:
        print(f"smtpq: {exc}", file=sys.stderr, flush=True)
        return 2
    return 2 if daemon.failed else 0


@dataclass(frozen=True)
class WorkerSpec:
    """What a supervisor tells a worker it starts (as JSON on the worker's standard input).

    :ivar config: the supervisor's effective configuration as TOML (with secrets): a worker
        restarted after a reload runs with what the others run with, whatever the file says.
    :ivar locks: shard index -> the inherited descriptor of that shard's lock.
    :ivar status_fd: where the worker writes ``"<index> <event>\\n"`` lines.
    """

    index: int
    workers: int
    config: str
    source_path: str | None
    source_overrides: dict[str, Any] = field(default_factory=dict)
    locks: dict[int, int] = field(default_factory=dict)
    status_fd: int = -1

    def to_json(self) -> bytes:
        """The spec as one JSON document."""
        data = {**self.__dict__, "locks": {str(k): v for k, v in self.locks.items()}}
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerSpec:
        """Read what :meth:`to_json` wrote."""
        fields = json.loads(data)
        fields["locks"] = {int(k): int(v) for k, v in fields["locks"].items()}
        return cls(**fields)


def main() -> int:
    """A worker process: read the spec, adopt the shard locks, run the daemon."""
    spec = WorkerSpec.from_json(sys.stdin.buffer.read())
    try:
        # Validated by the supervisor; built again here, with its TLS and credentials files.
        config = build_config(tomllib.loads(spec.config))
    except ConfigError as exc:
        print(f"smtpq: worker {spec.index}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    source = ConfigSource(spec.source_path, spec.source_overrides)
    owned = [shard_at(config, index) for index in sorted(spec.locks)]
    shared = not owned  # Redis: one queue that every worker serves, no lock
    if shared:
        owned = [shard_at(config, 0)]
    try:
        locks = [
            ShardLock.inherit(shard.path, spec.locks[shard.index])
            for shard in owned
            if shard.path is not None
        ]
    except (ShardLocked, ValueError, OSError) as exc:
        print(f"smtpq: worker {spec.index}: {exc}", file=sys.stderr, flush=True)
        return 2

    def events(event: str) -> None:
        if event in ("ready", "reloaded"):
            os.write(spec.status_fd, f"{spec.index} {event}\n".encode())

    try:
        return run_daemon(
            config, owned, workers=spec.workers, source=source, events=events,
            admin=not shared or spec.index == 0,
        )  # fmt: skip
    finally:
        for lock in locks:
            lock.release()
