"""The daemon's configuration: defaults that work, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpq.daemon.config import ConfigError, load_config, parse_hostport
from smtpq.relay.mx import Route


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
