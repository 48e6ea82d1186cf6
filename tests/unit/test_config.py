"""The daemon's configuration: defaults that work, and clear errors."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from smtpq.daemon import config as config_module
from smtpq.daemon.config import (
    Config,
    ConfigError,
    LogFormat,
    LogLevel,
    RelayType,
    StorageType,
    build_config,
    load_config,
    parse_hostport,
)
from smtpq.daemon.render import render_config
from smtpq.relay.mx import Route
from smtpq.storage.disk import SyncMode


def test_defaults() -> None:
    config = load_config(None)
    assert config.storage.type == "disk"
    assert config.storage.path == "./smtpq-queue"
    assert config.listen == ("127.0.0.1:2525",)
    assert config.relay.type == "mx"
    assert config.retry.lifetime == 5 * 86400


def test_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "smtpq.toml"
    path.write_text(
        'hostname = "mx.example.org"\n'
        '[edge]\nlisten = ["127.0.0.1:2600", "[::1]:2600"]\nrelay_domains = ["example.org"]\n'
        '[relay]\ntype = "smarthost"\nhost = "smtp.example.net"\nport = 587\n'
        '[smtp]\ntls = "required"\n'
        "[retry]\ninitial = 60\n"
        '[routes]\n"Example.NET" = "[192.0.2.1]:2525"\n'
    )
    config = load_config(path, **{"storage.path": "/var/spool/smtpq", "workers": 2})
    assert config.hostname == "mx.example.org"
    assert config.listen_addresses() == [("127.0.0.1", 2600), ("::1", 2600)]
    assert config.edge.relay_domains == ("example.org",)
    assert config.edge.hostname == "mx.example.org"
    assert config.smtp.tls == "required"
    assert config.relay.port == 587
    assert config.retry.initial == 60.0
    assert config.mx.routes == {"example.net": Route("192.0.2.1", 2525)}
    assert config.storage.path == "/var/spool/smtpq"
    assert config.workers == 2


def test_edge_limits_load_from_the_file(tmp_path: Path) -> None:
    defaults = load_config(None).edge
    assert (defaults.max_connections, defaults.max_client_connections) == (1000, 50)
    assert (defaults.soft_error_limit, defaults.hard_error_limit, defaults.error_delay) == (
        10,
        20,
        1.0,
    )
    assert (defaults.max_auth_failures, defaults.timeout, defaults.min_data_rate) == (3, 300, 500)
    assert defaults.max_client_connection_rate == 0
    assert defaults.greet_delay == 0
    assert not defaults.allow_untrusted_routing
    known = tmp_path / "recipients"
    known.write_text("@example.org\n")
    path = tmp_path / "smtpq.toml"
    path.write_text(
        "[edge]\n"
        "max_connections = 200\nmax_client_connections = 5\nmax_client_connection_rate = 30\n"
        "soft_error_limit = 3\nhard_error_limit = 6\nerror_delay = 2\nmax_auth_failures = 2\n"
        "junk_command_limit = 10\nmax_commands = 500\ntimeout = 60\nmin_data_rate = 1000\n"
        "max_session_time = 600\ngreet_delay = 3\nallow_untrusted_routing = true\n"
        f'recipient_map = "{known}"\npostmaster = "admin@example.org"\n'
    )
    edge = load_config(path).edge
    assert (edge.max_connections, edge.max_client_connections) == (200, 5)
    assert edge.max_client_connection_rate == 30
    assert (edge.soft_error_limit, edge.hard_error_limit, edge.error_delay) == (3, 6, 2.0)
    assert (edge.max_auth_failures, edge.junk_command_limit, edge.max_commands) == (2, 10, 500)
    assert (edge.timeout, edge.min_data_rate, edge.max_session_time) == (60.0, 1000, 600.0)
    assert edge.greet_delay == 3.0
    assert edge.allow_untrusted_routing
    assert edge.recipient_map == str(known)
    assert edge.postmaster == "admin@example.org"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[edge]\nrecipient_map = "/nonexistent/map"\n', "recipient_map .* not found"),
        ('[edge]\npostmaster = "root"\n', "postmaster must be an address"),
        ("[edge]\nhard_error_limit = -1\n", "must not be negative"),
        ("[edge]\ntimeout = 0\n", "timeout must be positive"),
        ('[storage]\ntype = "tape"\n', "storage.type must be one of"),
        ("[edge]\nlisen = []\n", "unknown setting edge.lisen"),
        ("[edge]\nport = 25\n", "unknown setting edge.port"),
        ('[smtp]\ntls = "sometimes"\n', "smtp"),
        ('[edge]\ntrusted_networks = ["10.0.0.0/33"]\n', "edge"),
        ('[edge]\ntls_cert = "/nonexistent.pem"\ntls_key = "/nonexistent.pem"\n', "not found"),
        ('[relay]\ntype = "smarthost"\n', "needs relay.host"),
        ('[retry]\ninitial = "soon"\n', "retry.initial must be a number"),
        ("[retry]\ninitial = -1\n", "must not be negative"),
        ("workers = 0\n", "workers must be at least 1"),
        ('[edge]\nlisten = ["127.0.0.1:99999"]\n', "port out of range"),
        ('[admin]\nlisten = "127.0.0.1:8025"\n', "needs admin.token"),
        ("bogus = 1\n", "unknown setting bogus"),
        ("[edge\n", "config file"),
    ],
)
def test_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe = 1\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/smtpq.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mx.example.org", ("mx.example.org", 25)),
        ("mx.example.org:587", ("mx.example.org", 587)),
        ("[192.0.2.1]:2525", ("192.0.2.1", 2525)),
        ("[::1]:2525", ("::1", 2525)),
        ("::1", ("::1", 25)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 25) == expected


def test_closed_choices_are_enums_and_workers_default_to_the_usable_cores() -> None:
    config = load_config(None)
    assert config.storage.type is StorageType.DISK
    assert config.storage.sync is SyncMode.AUTO
    assert config.relay.type is RelayType.MX
    assert config.log_level is LogLevel.INFO
    assert config.log_format is LogFormat.TEXT
    assert config.workers == len(os.sched_getaffinity(0))
    chosen = build_config(
        {"storage": {"type": "redis", "sync": "none"}, "log_level": "debug", "log_format": "json"}
    )
    assert (chosen.storage.type, chosen.storage.sync) == (StorageType.REDIS, SyncMode.NONE)
    assert (chosen.log_level, chosen.log_format) == (LogLevel.DEBUG, LogFormat.JSON)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"log_format": "xml"}, "log_format must be one of text, json, not 'xml'"),
        ({"log_level": "loud"}, "log_level must be one of debug, info, warning, error"),
        ({"storage": {"sync": "sometimes"}}, "storage.sync must be one of auto, fsync"),
        ({"relay": {"type": "pigeon"}}, "relay.type must be one of mx, smarthost"),
        ({"edge": {"require_tls": True}}, "edge.require_tls need edge.tls_cert"),
        ({"edge": {"auth_required": True}}, "edge.auth_required needs edge.credentials_file"),
    ],
)
def test_choice_errors_name_the_setting(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_a_tls_file_that_does_not_load_is_a_config_error(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"edge.tls_cert {cert}: cannot load"):
        build_config({"edge": {"tls_cert": str(cert)}})


def example_from_docstring(uncomment: bool) -> str:
    """The annotated example in smtpq.daemon.config's docstring, commented lines uncommented."""
    doc = config_module.__doc__ or ""
    block = doc.split("An example (each commented line is valid as it stands\nonce uncommented)::")
    lines = []
    for line in block[1].splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        line = line[4:]
        if uncomment and line.startswith("# "):
            line = line[2:]
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("uncomment", [False, True])
def test_the_docstring_example_is_valid_toml_and_a_valid_config(
    tmp_path: Path, uncomment: bool
) -> None:
    text = example_from_docstring(uncomment)
    data = tomllib.loads(text)
    assert data["hostname"] == "mx.example.org"
    if uncomment:
        assert data["edge"]["tls_cert"] == "/etc/smtpq/cert.pem"
        assert data["admin"]["token"] == "change-me"
        # The files it names, for the check that they exist and load.
        for key in ("tls_cert", "tls_key", "credentials_file"):
            data["edge"][key] = str(tmp_path / key)
        data["edge"].pop("tls_cert")
        data["edge"].pop("tls_key")
        (tmp_path / "credentials_file").write_text("")
    config = build_config(data)
    assert config.workers == 2
    assert config.mx.routes == {"example.net": Route("192.0.2.10", 25)}


def full_config() -> Config:
    return build_config(
        {
            "hostname": "mx.example.org",
            "workers": 3,
            "log_format": "json",
            "edge": {
                "listen": ["127.0.0.1:2600", "[::1]:2600"],
                "relay_domains": ["example.org", ".example.net"],
                "max_recipients": 50,
            },
            "storage": {"type": "redis", "url": "redis://127.0.0.1:6390/2", "sync": "fsync"},
            "relay": {"type": "smarthost", "host": "smtp.example.net", "port": 587},
            "smtp": {"tls": "required", "username": "u", "password": 'p"w\\d', "pool_size": 4},
            "mx": {"nameservers": ["127.0.0.1:5353"], "ipv6": False},
            "routes": {"example.com": "[192.0.2.1]:2525", "v6.example": "[2001:db8::1]:25"},
            "retry": {"initial": 60, "delay_warnings": [3600, 14400]},
            "admin": {"socket": "/run/smtpq/admin.sock", "listen": "127.0.0.1:8025",
                      "token": "t0ken"},
        }
    )  # fmt: skip


@pytest.mark.parametrize("config", [load_config(None), full_config()], ids=["defaults", "full"])
def test_rendered_config_reads_back_the_same(config: Config) -> None:
    text = render_config(config)
    assert build_config(tomllib.loads(text)) == config
    assert render_config(build_config(tomllib.loads(text))) == text


def test_secrets_can_be_hidden() -> None:
    config = full_config()
    assert 'token = "t0ken"' in render_config(config)
    hidden = render_config(config, secrets=False)
    assert "t0ken" not in hidden
    assert 'p\\"w' not in hidden
    assert "# password = (hidden)" in hidden
    data = tomllib.loads(hidden)
    assert "password" not in data["smtp"]
    assert "token" not in data["admin"]
