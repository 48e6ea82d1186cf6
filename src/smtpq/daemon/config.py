"""The daemon's configuration: one TOML file, read once, into small frozen dataclasses.

Every setting has a working default, so ``smtpq serve`` with no file runs: disk storage in
``./smtpq-queue``, listening on 127.0.0.1:2525, delivering by MX. An example::

    hostname = "mx.example.org"

    [edge]
    listen = ["127.0.0.1:2525"]
    max_message_size = 10485760
    local_domains = ["example.org"]
    trusted_networks = ["127.0.0.0/8", "::1/128"]

    [storage]
    type = "disk"            # disk | redis | memory
    path = "./smtpq-queue"
    # url = "redis://127.0.0.1:6379/0"

    [relay]
    type = "mx"              # mx | smarthost
    # host = "smtp.example.net"; port = 587; starttls = "required"

    [routes]
    "example.net" = "[192.0.2.10]:25"

    [retry]
    initial = 300; factor = 2.0; maximum = 14400; lifetime = 432000

A config error is reported as one clear message (:class:`ConfigError`), never a traceback.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "EdgeSettings",
    "RelaySettings",
    "RetrySettings",
    "StorageSettings",
    "load_config",
    "parse_hostport",
]


class ConfigError(Exception):
    """The configuration is wrong; the message says where and how."""


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


@dataclass(frozen=True)
class EdgeSettings:
    """Where and how the SMTP edge listens, and whom it accepts mail for."""

    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_file: str | None = None
    timeout: float = 300.0


@dataclass(frozen=True)
class StorageSettings:
    """Which storage holds the queue."""

    type: str = "disk"
    path: str = "./smtpq-queue"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "smtpq:"
    lease_timeout: float = 60.0
    #: Unsafe: skip fsync (a crash may lose acknowledged mail). Benchmarks and tests only.
    unsafe_no_fsync: bool = False


@dataclass(frozen=True)
class RelaySettings:
    """How mail leaves: by MX look-up, or through a smarthost."""

    type: str = "mx"
    host: str | None = None
    port: int = 25
    starttls: str = "opportunistic"
    implicit_tls: bool = False
    username: str | None = None
    password: str | None = None
    pool_size: int = 10
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    nameservers: tuple[str, ...] = ()
    mx_port: int = 25
    helo_name: str | None = None


@dataclass(frozen=True)
class RetrySettings:
    """The retry schedule (see :class:`smtpq.backoff.DefaultBackoff`)."""

    initial: float = 300.0
    factor: float = 2.0
    maximum: float = 4 * 3600.0
    lifetime: float = 5 * 86400.0
    jitter: float = 0.1


@dataclass(frozen=True)
class AdminConfig:
    """The operators' HTTP API: a Unix socket (file permissions) and optional loopback TCP."""

    socket: str | None = None  # default: <storage path>/admin.sock
    listen: str | None = None  # e.g. "127.0.0.1:8025"; needs a token
    token: str | None = None


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    hostname: str = field(default_factory=socket.getfqdn)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    admin: AdminConfig = field(default_factory=AdminConfig)
    routes: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    relay_pool: int = 100
    grace_period: float = 30.0
    log_level: str = "info"

    def admin_socket(self) -> Path:
        """Where the admin API's Unix socket is."""
        if self.admin.socket:
            return Path(self.admin.socket)
        return Path(self.storage.path) / "admin.sock"


T = TypeVar("T")


def _section(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown setting {where}.{key}")
        default = getattr(cls(), key)
        kwargs[key] = _check(value, default, f"{where}.{key}")
    return cls(**kwargs)


def _check(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number")
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return type(default)(value) if isinstance(default, float) else value
    if isinstance(default, str) or default is None:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    return value


_CHOICES = {
    "storage.type": ("disk", "redis", "memory"),
    "relay.type": ("mx", "smarthost"),
    "relay.starttls": ("opportunistic", "required", "off"),
    "log_level": ("debug", "info", "warning", "error"),
}


def build_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    sections = {
        "edge": EdgeSettings,
        "storage": StorageSettings,
        "relay": RelaySettings,
        "retry": RetrySettings,
        "admin": AdminConfig,
    }
    kwargs: dict[str, Any] = {}
    defaults = Config(hostname="x")
    for key, value in data.items():
        if key in sections:
            kwargs[key] = _section(sections[key], value, key)
        elif key == "routes":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ConfigError('[routes] maps domains to "host:port" strings')
            for dest in value.values():
                parse_hostport(dest, 25)
            kwargs[key] = {k.lower(): v for k, v in value.items()}
        elif key in ("hostname", "workers", "relay_pool", "grace_period", "log_level"):
            kwargs[key] = _check(value, getattr(defaults, key), key)
        else:
            raise ConfigError(f"unknown setting {key}")
    config = Config(**kwargs)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    values = {
        "storage.type": config.storage.type,
        "relay.type": config.relay.type,
        "relay.starttls": config.relay.starttls,
        "log_level": config.log_level,
    }
    for key, value in values.items():
        if value not in _CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(_CHOICES[key])}, not {value!r}")
    if config.relay.type == "smarthost" and not config.relay.host:
        raise ConfigError("relay.type = 'smarthost' needs relay.host")
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.relay_pool < 1:
        raise ConfigError("relay_pool must be at least 1")
    if bool(config.edge.tls_cert) != bool(config.edge.tls_key):
        raise ConfigError("edge.tls_cert and edge.tls_key go together")
    if config.admin.listen and not config.admin.token:
        raise ConfigError("admin.listen needs admin.token")
    for address in config.edge.listen:
        parse_hostport(address, 25)
    if config.storage.lease_timeout <= 0:
        raise ConfigError("storage.lease_timeout must be positive")


def load_config(path: str | Path | None, **overrides: Any) -> Config:
    """Read the TOML file (if any) and apply command-line overrides (dotted keys)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    return build_config(data)
