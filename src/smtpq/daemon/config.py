"""The daemon's configuration: one TOML file, read once, into the components' frozen dataclasses.

Each section configures one component with that component's own dataclass, so a setting means
the same in the file as in the library: ``[edge]`` is :class:`~smtpq.edge.EdgeConfig` (plus
``listen``), ``[smtp]`` is :class:`~smtpq.relay.smtp.SmtpRelayConfig` (how we talk to other
servers), ``[mx]`` is :class:`~smtpq.relay.mx.MxRelayConfig`. Every setting has a working
default, so ``smtpq serve`` with no file runs: disk storage in ``./smtpq-queue``, listening on
127.0.0.1:2525, delivering by MX, one worker process per CPU core. ``smtpq config show`` prints
every setting with its effective value. An example (each commented line is valid as it stands
once uncommented)::

    hostname = "mx.example.org"
    workers = 2                       # processes (default: one per CPU core)
    log_level = "info"                # debug | info | warning | error
    log_format = "text"               # text | json (one object per line)

    [edge]
    listen = ["127.0.0.1:2525", "[::1]:2525"]
    max_message_size = 10485760
    relay_domains = ["example.org"]   # mail accepted for these from anyone
    trusted_networks = ["127.0.0.0/8", "::1/128"]
    # tls_cert = "/etc/smtpq/cert.pem"
    # tls_key = "/etc/smtpq/key.pem"
    # credentials_file = "/etc/smtpq/passwd"   # lines from `smtpq passwd USER`

    [storage]
    type = "disk"                     # disk | journal | redis | memory
    path = "./smtpq-queue"
    # url = "redis://127.0.0.1:6379/0"

    [relay]
    type = "mx"                       # mx | smarthost
    # host = "smtp.example.net"
    # port = 587

    [smtp]
    tls = "opportunistic"             # opportunistic | required | implicit | none
    # username = "user"
    # password = "secret"

    [mx]
    # nameservers = ["127.0.0.1:5353"]

    [routes]                          # per-domain destinations instead of MX look-ups
    "example.net" = "[192.0.2.10]:25"

    [destinations]                    # scheduling per next hop (docs/scheduling.md)
    concurrency = 20                  # attempts at once per destination
    initial_window = 5
    dead_after = 5                    # connection failures in a row: dead
    cool_down = 300                   # seconds dead before one probe (doubles, max_cool_down)

    [destinations."*.example.net"]    # a destination name, or a glob
    concurrency = 2
    message_rate = "30/min"           # also connection_rate; per second, minute or hour

    [retry]
    initial = 300
    factor = 2.0
    maximum = 14400
    lifetime = 432000
    delay_warnings = [14400]          # a "delayed" DSN after 4 hours (honours NOTIFY)

    [admin]
    # socket = "/run/smtpq/admin.sock"   # default: <storage.path>/shard-0/admin.sock
    # listen = "127.0.0.1:8025"          # /metrics and the API over TCP, with the token
    # token = "change-me"

A config error is reported as one clear message (:class:`ConfigError`), never a traceback.
"""

from __future__ import annotations

import enum
import os
import socket
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from smtpq.daemon.errors import StartupError
from smtpq.edge.server import EdgeConfig
from smtpq.queue.destinations import DestinationLimits, DestinationPolicy, parse_rate
from smtpq.relay.mx import MxRelayConfig, Route
from smtpq.relay.smtp import SmtpRelayConfig
from smtpq.storage.disk import SyncMode

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AdminConfig",
    "Config",
    "ConfigError",
    "ConfigSource",
    "LogFormat",
    "LogLevel",
    "RelayChoice",
    "RelayType",
    "RetryConfig",
    "StorageConfig",
    "StorageType",
    "build_config",
    "default_config_path",
    "default_workers",
    "load_config",
    "parse_hostport",
]


class ConfigError(StartupError):
    """The configuration is wrong; the message says where and how."""


class StorageType(enum.StrEnum):
    """Where the queue is stored."""

    #: Files in a directory (``storage.path``), one shard per worker process: two small files
    #: per message (:class:`~smtpq.storage.DiskStorage`).
    DISK = "disk"
    #: An append-only journal in a directory (``storage.path``), one shard per worker process:
    #: one flush per batch of changes (:class:`~smtpq.storage.JournalStorage`).
    JOURNAL = "journal"
    #: A Redis server (``storage.url``) shared by every worker, on any number of hosts.
    REDIS = "redis"
    #: In memory: lost when the daemon stops (tests, throw-away set-ups).
    MEMORY = "memory"

    @property
    def local(self) -> bool:
        """Whether the queue lies in ``storage.path``, one shard per worker process."""
        return self in (StorageType.DISK, StorageType.JOURNAL)


class RelayType(enum.StrEnum):
    """How mail leaves."""

    #: DNS MX look-ups per recipient domain, with the ``[routes]`` table first.
    MX = "mx"
    #: Everything to one host (``relay.host``:``relay.port``).
    SMARTHOST = "smarthost"


class LogLevel(enum.StrEnum):
    """The least severe log records written."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    """How log records are written to standard error."""

    #: ``time smtpq[pid] LEVEL logger: message``, as syslog-style tools expect.
    TEXT = "text"
    #: One JSON object per line: ``time``, ``level``, ``logger``, ``pid``, ``message``.
    JSON = "json"


E = TypeVar("E", bound=enum.StrEnum)


def _choice(cls: type[E], value: Any, name: str) -> E:
    """``value`` (a TOML string) as a member of ``cls``; a clear error if it is none."""
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(member.value for member in cls)
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}") from None


def default_workers() -> int:
    """One worker per CPU core this process may run on (its affinity, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without sched_getaffinity
        return os.cpu_count() or 1


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``[host]:port`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ConfigError(f"address {text!r} has no host")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"address {text!r} has a bad port") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"address {text!r}: port out of range")
    return host, number


def format_hostport(host: str, port: int) -> str:
    """``(host, port)`` as ``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class StorageConfig:
    """Which storage holds the queue.

    :ivar sync: disk durability, a :class:`SyncMode`; ``none`` is unsafe: a crash may lose mail
        that was acknowledged with 250. See :mod:`smtpq.storage.disk`. A journal flushes each
        append with ``fdatasync`` in every mode but ``none``.
    :ivar cluster, shards, wait_replicas, wait_timeout: Redis storage on a Redis Cluster (``url``
        names any node), the shards new mail is spread over, and the replicas each write must
        reach within ``wait_timeout`` seconds. See docs/redis.md.
    """

    type: StorageType = StorageType.DISK
    path: str = "./smtpq-queue"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "smtpq:"
    lease_timeout: float = 60.0
    sync: SyncMode = SyncMode.AUTO
    cluster: bool = False
    shards: int = 16
    wait_replicas: int = 0
    wait_timeout: float = 1.0

    def __post_init__(self) -> None:
        # From TOML the choices arrive as plain strings.
        object.__setattr__(self, "type", _choice(StorageType, self.type, "storage.type"))
        object.__setattr__(self, "sync", _choice(SyncMode, self.sync, "storage.sync"))


@dataclass(frozen=True)
class RelayChoice:
    """How mail leaves: ``mx`` (DNS, with [routes]) or ``smarthost`` (``host``:``port``)."""

    type: RelayType = RelayType.MX
    host: str | None = None
    port: int = 25

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _choice(RelayType, self.type, "relay.type"))


@dataclass(frozen=True)
class RetryConfig:
    """The retry schedule (see :class:`smtpq.backoff.DefaultBackoff`)."""

    initial: float = 300.0
    factor: float = 2.0
    maximum: float = 4 * 3600.0
    lifetime: float = 5 * 86400.0
    jitter: float = 0.1
    #: Message ages (seconds) at which a "delayed" DSN goes to the sender; none by default.
    delay_warnings: tuple[float, ...] = ()


@dataclass(frozen=True)
class AdminConfig:
    """The operators' HTTP API: a Unix socket (file permissions) and optional loopback TCP."""

    socket: str | None = None
    listen: str | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    hostname: str = field(default_factory=socket.getfqdn)
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    relay: RelayChoice = field(default_factory=RelayChoice)
    smtp: SmtpRelayConfig = field(default_factory=SmtpRelayConfig)
    mx: MxRelayConfig = field(default_factory=MxRelayConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    destinations: DestinationPolicy = field(default_factory=DestinationPolicy)
    workers: int = field(default_factory=default_workers)
    relay_pool: int = 100
    grace_period: float = 30.0
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_level", _choice(LogLevel, self.log_level, "log_level"))
        object.__setattr__(self, "log_format", _choice(LogFormat, self.log_format, "log_format"))

    def admin_socket(self) -> Path:
        """Where the admin API's Unix socket is."""
        if self.admin.socket:
            return Path(self.admin.socket)
        return Path(self.storage.path) / "admin.sock"

    def listen_addresses(self) -> list[tuple[str, int]]:
        """The edge's (host, port) pairs."""
        return [parse_hostport(a, 25) for a in self.listen]


@dataclass(frozen=True)
class ConfigSource:
    """Where a configuration comes from, so that it can be read again (on SIGHUP): the file,
    if any, and the command-line overrides (``section.key`` names, as :func:`load_config`)."""

    path: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        """Read and validate the configuration (:class:`ConfigError` if it is wrong)."""
        return load_config(self.path, **self.overrides)


T = TypeVar("T")

_SECTIONS: dict[str, type[Any]] = {
    "edge": EdgeConfig,
    "storage": StorageConfig,
    "relay": RelayChoice,
    "smtp": SmtpRelayConfig,
    "mx": MxRelayConfig,
    "retry": RetryConfig,
    "admin": AdminConfig,
}
#: Set elsewhere: edge host/port come from `listen`, its hostname from `hostname`; routes from
#: the [routes] table.
RESERVED = {"edge": {"host", "port", "hostname"}, "mx": {"routes"}}
#: The top-level settings (not tables).
TOP = ("hostname", "workers", "relay_pool", "grace_period", "log_level", "log_format")


def _section(cls: type[T], data: Any, where: str, extra: dict[str, Any]) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    defaults = cls()
    kwargs: dict[str, Any] = dict(extra)
    names = {f.name for f in fields(cls)} - RESERVED.get(where, set())  # type: ignore[arg-type]
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown setting {where}.{key}")
        kwargs[key] = _check(value, getattr(defaults, key), f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


def _check(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not isinstance(value, list) or not (numbers or all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where} must be a list of strings or of numbers")
        return tuple(float(v) for v in value) if numbers and value else tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number")
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, (str, enum.Enum)) or default is None:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string")
        return value
    return value


def build_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    top: dict[str, Any] = {}
    defaults = Config(hostname="localhost", workers=1)
    for key, value in data.items():
        if key not in (*_SECTIONS, "routes", "destinations", *TOP):
            raise ConfigError(f"unknown setting {key}")
        if key in TOP:
            top[key] = _check(value, getattr(defaults, key), key)
    hostname = top.get("hostname") or socket.getfqdn()
    edge_data = dict(data.get("edge", {})) if isinstance(data.get("edge", {}), dict) else None
    if edge_data is None:
        raise ConfigError("[edge] must be a table")
    listen = _check(edge_data.pop("listen", list(defaults.listen)), (), "edge.listen")
    routes = _routes(data.get("routes", {}))
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        extra: dict[str, Any] = {}
        if name == "edge":
            extra = {"hostname": hostname}
        elif name == "mx":
            extra = {"routes": routes}
        section = edge_data if name == "edge" else data.get(name, {})
        sections[name] = _section(cls, section, name, extra)
    destinations = _destinations(data.get("destinations", {}))
    config = Config(listen=listen, **sections, **top, destinations=destinations)
    _validate(config)
    return config


_RATES = ("message_rate", "connection_rate")


def _destinations(value: Any) -> DestinationPolicy:
    """``[destinations]``: the defaults, and a sub-table per name pattern that overrides some
    of them (``[destinations."example.com"]``)."""
    if not isinstance(value, dict):
        raise ConfigError("[destinations] must be a table")
    defaults = {k: v for k, v in value.items() if not isinstance(v, dict)}
    max_wait = _check(defaults.pop("max_wait", 120.0), 120.0, "destinations.max_wait")
    default = _limits(DestinationLimits(), defaults, "destinations")
    patterns = tuple(
        (pattern, _limits(default, table, f'destinations."{pattern}"'))
        for pattern, table in value.items()
        if isinstance(table, dict)
    )
    try:
        return DestinationPolicy(default, patterns, max_wait=max_wait)
    except ValueError as exc:
        raise ConfigError(f"[destinations]: {exc}") from None


def _limits(base: DestinationLimits, data: dict[str, Any], where: str) -> DestinationLimits:
    names = {f.name for f in fields(DestinationLimits)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown setting {where}.{key}")
        if key in _RATES:
            try:
                changes[key] = parse_rate(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
        else:
            changes[key] = _check(value, getattr(base, key), f"{where}.{key}")
    try:
        return replace(base, **changes)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


def _routes(value: Any) -> dict[str, Route]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError('[routes] maps domains to "host:port" strings')
    return {domain.lower(): Route(*parse_hostport(dest, 25)) for domain, dest in value.items()}


def _validate(config: Config) -> None:
    if config.relay.type == RelayType.SMARTHOST and not config.relay.host:
        raise ConfigError("relay.type = 'smarthost' needs relay.host")
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.relay_pool < 1:
        raise ConfigError("relay_pool must be at least 1")
    if not config.listen:
        raise ConfigError("edge.listen needs at least one address")
    if config.admin.listen:
        if not config.admin.token:
            raise ConfigError("admin.listen needs admin.token")
        parse_hostport(config.admin.listen, 8025)
    config.listen_addresses()
    if config.storage.lease_timeout <= 0:
        raise ConfigError("storage.lease_timeout must be positive")
    if not 1 <= config.storage.shards <= 256:
        raise ConfigError("storage.shards must be from 1 to 256")
    _validate_edge_files(config.edge)


def _validate_edge_files(edge: EdgeConfig) -> None:
    """The edge's TLS and credentials files exist and load: a reload checks them before it
    applies anything, and a start-up says which file is wrong rather than failing later."""
    for name in ("tls_cert", "tls_key", "credentials_file"):
        path = getattr(edge, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"edge.{name}: file {path} not found")
    if (edge.implicit_tls or edge.require_tls) and not edge.tls_cert:
        raise ConfigError("edge.implicit_tls and edge.require_tls need edge.tls_cert")
    if edge.auth_required and not edge.credentials_file:
        raise ConfigError("edge.auth_required needs edge.credentials_file")
    try:
        edge.tls_context()
    except ssl.SSLError:  # OpenSSL's own text names its source file, not ours
        raise ConfigError(
            f"edge.tls_cert {edge.tls_cert}: cannot load: not a PEM certificate and key"
        ) from None
    except OSError as exc:
        raise ConfigError(f"edge.tls_cert {edge.tls_cert}: cannot load: {exc.strerror}") from None
    if edge.credentials_file:
        try:
            Path(edge.credentials_file).read_text("utf-8")
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"edge.credentials_file {edge.credentials_file}: {reason}") from None


#: The configuration file of a configured host, used when no ``-c`` is given.
DEFAULT_CONFIG_PATH = Path("/etc/smtpq/smtpq.toml")


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The file ``smtpq serve`` and ``smtpq queue`` read when no ``-c`` is given.

    ``$SMTPQ_CONFIG`` when set (it must exist: a name given on purpose that is wrong is an
    error, not a silent fall-back to the defaults), else :data:`DEFAULT_CONFIG_PATH` when it
    exists, else None: the built-in defaults. So the daemon and the operators' commands on a
    configured host agree on the queue and its admin socket without being told.
    """
    named = environ.get("SMTPQ_CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    """Read the TOML file (if any) and apply command-line overrides (``section.key`` names)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key:
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] must be a table")
            table[key] = value
        else:
            data[section] = value
    return build_config(data)
