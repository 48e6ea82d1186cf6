"""The daemon's parts, wired from a Config: shards, storage, relay, queue; start-up checks.

With disk storage the queue directory is split into shards, ``shard-0``, ``shard-1``, ...;
with ``workers = N`` worker ``i`` owns the shards ``i, i + N, ...``, so every message is stored,
scheduled and delivered by exactly one process, and a queue written by more workers than now
run is still delivered. Each shard is locked by its owner (:mod:`smtpq.storage.lock`) and has
its own admin socket (``shard-K/admin.sock``). With Redis storage all workers share one queue.

Nothing here touches a queue before its lock is held: :func:`preflight` takes the locks first,
then checks that no live daemon answers on the admin sockets and that the listening addresses
are free, so that a start that fails leaves a running daemon exactly as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from smtpq.backoff import DefaultBackoff
from smtpq.clock import Clock, SystemClock
from smtpq.daemon.config import (
    Config,
    ConfigError,
    RelayType,
    StorageType,
    format_hostport,
    parse_hostport,
)
from smtpq.daemon.errors import StartupError
from smtpq.envelope import Envelope
from smtpq.policy import AddMissingHeaders, AddReceivedHeader
from smtpq.queue import Queue
from smtpq.queue.destinations import DestinationPolicy
from smtpq.queue.shared import DestinationStore
from smtpq.relay.base import Relay, RelayResult
from smtpq.relay.mx import MxSmtpRelay
from smtpq.relay.smtp import StaticSmtpRelay
from smtpq.storage.base import QueueStorage
from smtpq.storage.dict import DictStorage
from smtpq.storage.disk import DiskStorage, SyncMode
from smtpq.storage.journal import JournalStorage
from smtpq.storage.lock import ShardLock, ShardLocked
from smtpq.storage.redis import RedisStorage

__all__ = [
    "ReloadableRelay",
    "Shard",
    "build_backoff",
    "build_queue",
    "build_relay",
    "build_storage",
    "check_admin_socket",
    "lock_shard",
    "open_offline_queue",
    "preflight",
    "probe_listen",
    "shard_at",
    "shards",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One queue of the daemon: a disk shard, or the one shared (Redis) or memory queue."""

    index: int
    path: Path | None  # the shard's directory (disk storage only)
    admin_socket: Path


def shard_at(config: Config, index: int) -> Shard:
    """Shard ``index`` of the configured queue."""
    if not config.storage.type.local:
        return Shard(0, None, config.admin_socket())
    path = Path(config.storage.path) / f"shard-{index}"
    socket_path = config.admin.socket
    admin = Path(socket_path) if socket_path and index == 0 else path / "admin.sock"
    return Shard(index, path, admin)


def shards(config: Config, worker: int | None = None, workers: int = 1) -> list[Shard]:
    """The queues of the daemon, or of one worker (``worker`` of ``workers``).

    For local (disk or journal) storage: every ``shard-K`` directory found (and the worker's
    own); worker ``i`` owns the shards with ``K % workers == i``. Other storages have one queue.
    """
    if not config.storage.type.local:
        return [shard_at(config, 0)]
    root = Path(config.storage.path)
    found = {int(p.name[6:]) for p in root.glob("shard-*") if p.name[6:].isdigit() and p.is_dir()}
    found |= {worker} if worker is not None else {0}
    chosen = sorted(k for k in found if worker is None or k % workers == worker)
    return [shard_at(config, k) for k in chosen]


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents (``0700``), each made durable in its parent: a
    queue directory that a crash could take away would take acknowledged mail with it."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_shard(path: Path, *, create: bool) -> ShardLock:
    """Take the lock of a shard directory (made first if ``create``), or a StartupError."""
    try:
        if create:
            _make_dirs(path)
        return ShardLock(path).acquire()
    except ShardLocked as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot use queue directory {path}: {_reason(exc)}") from None


def check_admin_socket(path: Path) -> None:
    """Refuse when a live daemon answers on ``path`` (its socket must never be unlinked),
    or when the socket could not be made there; a stale socket is fine (it is replaced)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        except OSError as exc:
            raise StartupError(f"cannot use admin socket {path}: {_reason(exc)}") from None
        else:
            raise StartupError(f"admin socket {path} is in use by a running daemon")
    parent = path.parent
    try:
        _make_dirs(parent)
    except OSError as exc:
        raise StartupError(f"cannot create admin socket {path}: {_reason(exc)}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = os.strerror(errno.EACCES)
        raise StartupError(f"cannot create admin socket {path}: {reason}")


def probe_listen(addresses: Iterable[tuple[str, int]]) -> None:
    """Check that each address can be listened on, by binding it without SO_REUSEPORT.

    Workers listen with SO_REUSEPORT, which would let them share a port with another daemon
    of the same user without a word; a plain bind fails if anyone listens there.
    """
    for host, port in addresses:
        where = format_hostport(host, port)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StartupError(f"cannot listen on {where}: {exc.strerror}") from None
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {where}: {_reason(exc)}") from None


def preflight(config: Config, owned: Sequence[Shard]) -> dict[int, ShardLock]:
    """Everything a start checks before it touches anything: the shards' locks (taken, and
    returned) and that none holds a queue of the other local type, then the admin sockets and
    the listening addresses. StartupError on failure, with the locks released again."""
    locks: dict[int, ShardLock] = {}
    try:
        for shard in owned:
            if shard.path is not None:
                locks[shard.index] = lock_shard(shard.path, create=True)
                _refuse_the_other_layout(shard.path, config.storage.type)
        for shard in owned:
            check_admin_socket(shard.admin_socket)
        addresses = config.listen_addresses()
        if config.admin.listen and any(shard.index == 0 for shard in owned):
            addresses.append(parse_hostport(config.admin.listen, 8025))
        probe_listen(addresses)
    except BaseException:
        for lock in locks.values():
            lock.release()
        raise
    return locks


def build_storage(config: Config, shard: Shard, *, read_only: bool = False) -> QueueStorage:
    """The storage the config names, for one shard (not yet loaded; nothing is created).

    :param read_only: for a listing without the shard's lock, beside a daemon that may be
        writing: a journal then repairs nothing it finds (see JournalStorage).
    """
    settings = config.storage
    if settings.type == StorageType.MEMORY:
        return DictStorage(lease_timeout=settings.lease_timeout)
    if settings.type == StorageType.REDIS:
        try:
            return RedisStorage.from_url(
                settings.url,
                prefix=settings.prefix,
                lease_timeout=settings.lease_timeout,
                cluster=settings.cluster,
                shards=settings.shards,
                wait_replicas=settings.wait_replicas,
                wait_timeout=settings.wait_timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"storage.url: {exc}") from None
    assert shard.path is not None
    _refuse_the_other_layout(shard.path, settings.type)
    if settings.type == StorageType.JOURNAL:
        return JournalStorage(
            shard.path / "journal",
            durable=settings.sync != SyncMode.NONE,
            lease_timeout=settings.lease_timeout,
            read_only=read_only,
        )
    return DiskStorage(
        shard.path / "env",
        shard.path / "meta",
        lease_timeout=settings.lease_timeout,
        sync=settings.sync.value,
    )


def _refuse_the_other_layout(path: Path, kind: StorageType) -> None:
    """A shard that holds a queue of the other local storage type is a start-up error: its
    mail would sit there unseen (change ``storage.type`` only on an empty queue)."""
    other, names = (
        ("journal", [path / "journal"])
        if kind == StorageType.DISK
        else ("disk", [path / "env", path / "meta"])
    )
    for where in names:
        with contextlib.suppress(OSError):
            if any(entry.name != "corrupt" and entry.name != "tmp" for entry in os.scandir(where)):
                raise StartupError(
                    f"queue directory {path} holds a {other} queue, not storage.type = {kind}"
                    f" (deliver or move its mail first, or set storage.type = {other})"
                )


def build_relay(config: Config) -> Relay:
    """The relay the config names: a smarthost, or MX routing (with the static routes)."""
    smtp = config.smtp
    if smtp.helo_name is None:
        smtp = replace(smtp, helo_name=config.hostname)
    if config.relay.type == RelayType.SMARTHOST:
        assert config.relay.host is not None
        return StaticSmtpRelay(config.relay.host, config.relay.port, config=smtp)
    return MxSmtpRelay(config.mx, smtp)


def build_backoff(config: Config, clock: Clock) -> DefaultBackoff:
    """The retry schedule of ``[retry]``."""
    t = config.retry
    return DefaultBackoff(
        initial=t.initial, factor=t.factor, maximum=t.maximum, lifetime=t.lifetime,
        jitter=t.jitter, clock=clock,
    )  # fmt: skip


def build_queue(
    config: Config,
    storage: QueueStorage,
    relay: Relay | None,
    clock: Clock,
    destinations: tuple[DestinationPolicy, DestinationStore] | None = None,
) -> Queue:
    """The Queue with the daemon's backoff and the trace/missing-header policies (and the
    worker's destination policy and store, :func:`~smtpq.daemon.destinations.destination_setup`)."""
    policy, shared = destinations or (config.destinations, None)
    return Queue(
        storage,
        relay,
        backoff=build_backoff(config, clock),
        relay_pool=config.relay_pool,
        clock=clock,
        grace_period=config.grace_period,
        hostname=config.hostname,
        policies=[AddReceivedHeader(config.hostname), AddMissingHeaders(config.hostname)],
        delay_warnings=config.retry.delay_warnings,
        lifetime=config.retry.lifetime,
        destinations=policy,
        destination_store=shared,
    )


def _holds_queue(path: Path) -> bool:
    """Whether a shard directory holds a stored queue (a disk queue's or a journal's)."""
    return (path / "journal").is_dir() or ((path / "env").is_dir() and (path / "meta").is_dir())


@contextlib.asynccontextmanager
async def open_offline_queue(
    config: Config, shard: Shard, *, changes: bool = True
) -> AsyncIterator[Queue]:
    """A relay-less Queue on a stored queue, for operator commands when no daemon runs.

    :param changes: the command changes the queue (flush, hold, delete...): a disk shard's
        lock is taken for the command's duration, so that no daemon starts under it, and a
        shard that a process holds is refused (StartupError naming the directory and pid).
        A command that only reads (list, show, shape) reads without the lock.

    Never creates a queue: a directory that holds none is a StartupError. Not loaded here: a
    disk queue loads its schedule when an action first needs it, and a listing reads only
    what it lists.
    """
    lock: ShardLock | None = None
    if shard.path is not None:
        if not _holds_queue(shard.path):
            root = shard.path.parent
            where = shard.path if any(_holds_queue(p) for p in root.glob("shard-*")) else root
            raise StartupError(f"no queue in {where}")
        if changes:
            lock = lock_shard(shard.path, create=False)
    try:
        storage = build_storage(config, shard, read_only=not changes)
        try:
            yield build_queue(config, storage, None, SystemClock())
        finally:
            await storage.close()
    finally:
        if lock is not None:
            lock.release()


class ReloadableRelay(Relay):
    """The daemon's relay, which a reload replaces between attempts.

    An attempt keeps the relay it started with; a replaced relay is closed once its last
    attempt has finished, so that no delivery is cut off half way.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._running: dict[int, int] = {}  # id(relay) -> attempts under way
        self._closing: set[asyncio.Task[None]] = set()

    def destinations(self, envelope: Envelope) -> Mapping[str, list[str]]:
        """The current relay's destinations (the scheduler's view of the next hops)."""
        return self.relay.destinations(envelope)

    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        """Deliver through the current relay."""
        relay = self.relay
        key = id(relay)
        self._running[key] = self._running.get(key, 0) + 1
        try:
            return await relay.attempt(envelope, attempts)
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
                if relay is not self.relay:
                    self._close_later(relay)

    def replace(self, relay: Relay) -> None:
        """Deliver through ``relay`` from now on; the old one closes when it is idle."""
        old, self.relay = self.relay, relay
        if id(old) not in self._running:
            self._close_later(old)

    def _close_later(self, relay: Relay) -> None:
        task = asyncio.get_running_loop().create_task(relay.close())
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("closing the replaced relay failed", exc_info=task.exception())

    async def close(self) -> None:
        """Close the current relay and wait for the replaced ones."""
        await self.relay.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
