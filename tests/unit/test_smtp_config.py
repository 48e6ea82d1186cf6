"""The SMTP components' configuration, as the daemon builds it from TOML (strings, lists)."""

from __future__ import annotations

from typing import Any

import pytest

from smtpq.edge import EdgeConfig
from smtpq.relay import MxRelayConfig, SmtpRelayConfig, StaticSmtpRelay, TlsMode


def from_toml(cls: type[Any], **values: Any) -> Any:
    """What the daemon does: keyword arguments straight from a parsed TOML table."""
    return cls(**values)


def test_strings_and_lists_become_enums_and_tuples() -> None:
    smtp = from_toml(SmtpRelayConfig, tls="implicit", pool_size=3)
    assert smtp.tls is TlsMode.IMPLICIT
    assert from_toml(SmtpRelayConfig, tls="off").tls is TlsMode.NONE
    mx = from_toml(MxRelayConfig, nameservers=["127.0.0.1:5353"], tls_required_domains=["a"])
    assert (mx.nameservers, mx.tls_required_domains) == (("127.0.0.1:5353",), ("a",))
    edge = from_toml(EdgeConfig, relay_domains=["example.org"], trusted_networks=["10.0.0.0/8"])
    assert (edge.relay_domains, edge.trusted_networks) == (("example.org",), ("10.0.0.0/8",))
    same = EdgeConfig(relay_domains=("example.org",), trusted_networks=("10.0.0.0/8",))
    assert hash(edge) == hash(same)


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (SmtpRelayConfig, {"tls": "sometimes"}),
        (MxRelayConfig, {"nameservers": ["ns.example"]}),
        (EdgeConfig, {"trusted_networks": ["localhost"]}),
    ],
)
def test_bad_values_fail_at_load_time(cls: type[Any], values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"valid|appear"):
        from_toml(cls, **values)


def test_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(SmtpRelayConfig(username="u", password="s3cret"))


def test_pool_size_argument_overrides_config() -> None:
    relay = StaticSmtpRelay("smarthost.example", 587, 2, config=SmtpRelayConfig(pool_size=9))
    assert relay.config.pool_size == 2
    assert relay.config.tls is TlsMode.OPPORTUNISTIC
