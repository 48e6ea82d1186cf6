"""Every name DESIGN.md §1 (public API) and §4 (relays, edge) lists is importable from ``smtpq``,
with the leading parameters it documents, slimta's names and defaults."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import smtpq

REQUIRED = inspect.Parameter.empty

#: name -> the leading parameters §1 documents, with their defaults (REQUIRED: none).
DOCUMENTED: dict[str, dict[str, Any]] = {
    "Envelope": {"sender": None, "recipients": None, "headers": None, "message": None},
    "Reply": {"code": None, "message": None, "command": None, "address": None},
    "Relay": {},
    "RelayError": {},
    "PermanentRelayError": {"msg": "", "reply": None},
    "TransientRelayError": {"msg": "", "reply": None},
    "Queue": {
        "store": REQUIRED,
        "relay": None,
        "backoff": None,
        "bounce_factory": None,
        "bounce_queue": None,
        "store_pool": None,
        "relay_pool": None,
    },
    "QueueError": {},
    "QueueEvent": {},
    "Bounce": {
        "envelope": REQUIRED,
        "reply": REQUIRED,
        "headers_only": False,
    },
    "QueuePolicy": {},
    "RecipientSplit": {},
    "RecipientDomainSplit": {},
    "AddReceivedHeader": {},
    "AddMissingHeaders": {},
    "QueueStorage": {},
    "DictStorage": {"envelope_db": None, "meta_db": None},
    "DiskStorage": {"env_dir": REQUIRED, "meta_dir": REQUIRED, "tmp_dir": None},
    "RedisStorage": {
        "host": "localhost",
        "port": 6379,
        "db": 0,
        "password": None,
        "socket_timeout": None,
        "prefix": "smtpq:",
    },
    "StaticSmtpRelay": {"host": REQUIRED, "port": 25, "pool_size": None},
    "MxSmtpRelay": {},
    "SmtpEdge": {},
    "exponential_backoff": {},
    "DefaultBackoff": {},
    "ManualClock": {},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_importable_from_smtpq(name: str) -> None:
    params = DOCUMENTED[name]
    exported = getattr(smtpq, name)
    assert name in smtpq.__all__
    assert exported.__doc__, f"{name} has no docstring"
    if params:
        signature = inspect.signature(exported)
        leading = list(signature.parameters.values())[: len(params)]
        assert [(p.name, p.default) for p in leading] == list(params.items())


def test_star_import_gives_every_name() -> None:
    namespace: dict[str, Any] = {}
    exec("from smtpq import *", namespace)
    assert set(DOCUMENTED) <= set(namespace)
    assert all(hasattr(smtpq, name) for name in smtpq.__all__)


def test_redis_storage_also_from_a_url() -> None:
    store = smtpq.RedisStorage.from_url("redis://127.0.0.1:1/3", prefix="p:")
    assert isinstance(store, smtpq.QueueStorage)
    assert store.prefix == "p:"


def test_the_seed_documentation_backoff_works_verbatim() -> None:
    def exponential_backoff(envelope: Any, attempts: int) -> float | None:
        if attempts <= 5:
            return 12.0 * (5.0**attempts)
        return None

    env = smtpq.Envelope("a@example.org", ["b@example.net"])
    for attempts in range(1, 8):
        assert smtpq.exponential_backoff(env, attempts) == exponential_backoff(env, attempts)
    assert smtpq.exponential_backoff(env, 1) == 60.0
