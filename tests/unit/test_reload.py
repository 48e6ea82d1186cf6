"""What a SIGHUP changes: applied live, or named as needing a restart (and kept as it runs)."""

from __future__ import annotations

from typing import Any

from smtpq.daemon.config import Config, LogLevel, build_config
from smtpq.daemon.reload import plan_reload
from smtpq.relay.mx import Route

BASE: dict[str, Any] = {
    "hostname": "mx.example.org",
    "workers": 2,
    "edge": {"listen": ["127.0.0.1:2525"]},
    "storage": {"path": "/var/spool/smtpq"},
    "routes": {"a.example": "[192.0.2.1]:25"},
}


def config(**changes: Any) -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return build_config(data)


def test_nothing_changed() -> None:
    plan = plan_reload(config(), config())
    assert (plan.live, plan.restart) == ((), ())
    assert plan.config == config()


def test_live_settings_are_applied() -> None:
    new = config(
        routes={"a.example": "[192.0.2.2]:2525"},
        retry={"initial": 60},
        edge={"max_message_size": 1000, "relay_domains": ["example.org"]},
        smtp={"tls": "required"},
        relay={"type": "smarthost", "host": "smtp.example.net"},
        log_level="debug",
        grace_period=5,
    )
    plan = plan_reload(config(), new)
    assert set(plan.live) == {
        "routes", "retry.initial", "edge.max_message_size", "edge.relay_domains", "smtp.tls",
        "relay.type", "relay.host", "log_level", "grace_period",
    }  # fmt: skip
    assert plan.restart == ()
    assert plan.config == new
    assert plan.config.mx.routes == {"a.example": Route("192.0.2.2", 2525)}
    assert plan.config.log_level is LogLevel.DEBUG
    assert all(plan.changes(s) for s in ("mx", "retry", "edge", "smtp", "relay"))
    assert not plan.changes("storage")


def test_restart_settings_are_named_and_kept_as_they_run() -> None:
    running = config()
    new = config(
        hostname="other.example.org",
        workers=4,
        relay_pool=10,
        edge={"listen": ["127.0.0.1:2626"], "implicit_tls": False, "max_recipients": 5},
        storage={"path": "/elsewhere", "type": "memory"},
        admin={"socket": "/run/other.sock"},
    )
    plan = plan_reload(running, new)
    assert set(plan.restart) == {
        "hostname", "workers", "relay_pool", "listen", "storage.type", "storage.path",
        "admin.socket",
    }  # fmt: skip
    assert plan.live == ("edge.max_recipients",)
    kept = plan.config
    assert (kept.hostname, kept.workers, kept.relay_pool) == ("mx.example.org", 2, 100)
    assert kept.listen == ("127.0.0.1:2525",)
    assert kept.storage == running.storage
    assert kept.admin == running.admin
    assert kept.edge.hostname == "mx.example.org"
    assert kept.edge.max_recipients == 5  # the live part of the same section is applied


def test_what_the_listening_sockets_are_made_with_needs_a_restart() -> None:
    plan = plan_reload(config(), config(edge={"reuse_port": True}))
    assert plan.restart == ("edge.reuse_port",)
    assert plan.config.edge.reuse_port is False
