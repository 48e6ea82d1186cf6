"""``[destinations]`` in the daemon's TOML: defaults, patterns, rates, clear errors; and how the
daemon shares limits among its workers."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from smtpq.daemon.config import ConfigError, build_config, load_config
from smtpq.daemon.destinations import destination_setup
from smtpq.daemon.reload import plan_reload
from smtpq.daemon.render import render_config
from smtpq.queue.destinations import DestinationLimits
from smtpq.queue.shared import LocalDestinationStore
from smtpq.storage.redis_destinations import RedisDestinationStore


def config_from(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smtpq.toml"
    path.write_text(text)
    return path


def test_defaults_are_postfixs() -> None:
    policy = load_config(None).destinations
    assert policy.default == DestinationLimits()
    assert (policy.default.concurrency, policy.default.initial_window) == (20, 5)
    assert (policy.default.dead_after, policy.default.cool_down) == (5, 300.0)
    assert policy.patterns == ()


def test_defaults_and_patterns_that_override_some(tmp_path: Path) -> None:
    path = config_from(
        tmp_path,
        "[destinations]\nconcurrency = 10\ncool_down = 120\nmax_wait = 30\n"
        'message_rate = "600/min"\n'
        '[destinations."example.com"]\nconcurrency = 2\nconnection_rate = "1/s"\n'
        '[destinations."*.example.net"]\ndead_after = 0\n',
    )
    policy = load_config(path).destinations
    assert policy.max_wait == 30
    assert policy.default == DestinationLimits(concurrency=10, cool_down=120, message_rate=10.0)
    small = policy.limits_for("example.com")
    assert (small.concurrency, small.cool_down, small.message_rate) == (2, 120.0, 10.0)
    assert small.connection_rate == 1.0
    assert policy.limits_for("mx.example.net").dead_after == 0
    assert policy.limits_for("example.org") == policy.default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[destinations]\nwindow = 3\n", "unknown setting destinations.window"),
        ('[destinations."a.example"]\nfoo = 1\n', 'unknown setting destinations."a.example".foo'),
        ('[destinations]\nmessage_rate = "lots"\n', "destinations.message_rate: not a rate"),
        ("[destinations]\nconcurrency = 0\n", "concurrency and initial_window must be at least"),
        ('[destinations]\ncool_down = "soon"\n', "destinations.cool_down must be a number"),
        ("destinations = 3\n", "[destinations] must be a table"),
    ],
)
def test_mistakes_are_one_clear_message(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_from(tmp_path, text))
    assert message in str(caught.value)


async def test_workers_share_limits_through_redis_or_split_them(tmp_path: Path) -> None:
    path = config_from(tmp_path, '[destinations]\nconcurrency = 8\nmessage_rate = "4/s"\n')
    policy, store = destination_setup(load_config(path), 2)
    assert isinstance(store, LocalDestinationStore)
    assert (policy.default.concurrency, policy.default.message_rate) == (4, 2.0)  # a half each
    redis = load_config(path, **{"storage.type": "redis", "storage.url": "redis://127.0.0.1:1/0"})
    policy, store = destination_setup(redis, 2)
    assert isinstance(store, RedisDestinationStore)
    assert policy.default.concurrency == 8  # one limit for all, held in Redis
    await store.close()
    bad = load_config(path, **{"storage.type": "redis", "storage.url": "nowhere://x"})
    with pytest.raises(ConfigError, match=r"storage\.url"):
        destination_setup(bad, 1)


def test_a_reload_applies_new_destination_limits_live(tmp_path: Path) -> None:
    running = load_config(config_from(tmp_path, "[destinations]\nconcurrency = 10\n"))
    new = load_config(
        config_from(tmp_path, '[destinations]\nconcurrency = 10\n[destinations."a.example"]\n'
                    "concurrency = 2\n")
    )  # fmt: skip
    plan = plan_reload(running, new)
    assert plan.live == ("destinations.patterns",)
    assert plan.restart == ()
    assert plan.config.destinations.limits_for("a.example").concurrency == 2
    assert plan.changes("destinations")
    assert plan_reload(running, running).live == ()


def test_the_effective_configuration_shows_and_reads_back_the_destinations(tmp_path: Path) -> None:
    path = config_from(
        tmp_path,
        '[destinations]\nmessage_rate = "30/min"\nmax_wait = 60\n'
        '[destinations."*.Example.net"]\nconcurrency = 2\n',
    )
    config = load_config(path)
    text = render_config(config)
    assert '[destinations."*.example.net"]' in text
    assert "# connection_rate is not set" in text
    assert build_config(tomllib.loads(text)) == config
