"""A hypothesis state machine that holds a storage backend against DictStorage as the model.

Every rule does the same thing to the model and to the backend under test and compares what
they answer (values, or the exception raised), including across a restart: ``reopen`` closes the
storage and opens a new one on the same data. Backends subclass :class:`StorageMachine` with a
``backend_factory``, and expose ``TheirMachine.TestCase`` to pytest.

The schedule is compared through what a worker sees (claims, next due time); a claim takes every
due message, because with a limit the choice among messages due at the same time depends on
their ids, which differ between the model and the backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, Protocol, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from smtpq.envelope import Envelope
from smtpq.reply import Reply
from smtpq.storage import DictStorage, QueueStorage, StoredMessage

__all__ = ["BackendFactory", "MachineBackend", "StorageMachine"]

T = TypeVar("T")
START = 1_800_000_000.0
LEASE = 30.0


class MachineBackend(Protocol):
    """The data of one backend under test (a directory, a Redis key prefix...)."""

    async def open(self) -> QueueStorage:
        """A new storage object on this data, with ``lease_timeout`` = :data:`LEASE`."""

    async def destroy(self) -> None:
        """Delete the data (the storages opened on it are closed already)."""


#: Makes a fresh, empty backend for one run of the machine.
BackendFactory = Callable[[], Awaitable[MachineBackend]]

addresses = st.sampled_from(["a@example.org", "b@example.com", "ü@exämple.de", ""])
envelopes = st.builds(
    lambda sender, rcpts, body, utf8: _envelope(sender, rcpts, body, utf8),
    addresses,
    st.lists(st.sampled_from([f"r{i}@example.net" for i in range(6)]), min_size=1, max_size=4),
    st.binary(max_size=300),
    st.booleans(),
)
replies = st.none() | st.builds(
    Reply,
    st.sampled_from(["421", "450", "451", "452"]),
    st.sampled_from(["4.7.1 greylisted", "try later", "4.2.2 mailbox full\r\nsecond line"]),
)
delays = st.integers(min_value=-60, max_value=600).map(float)


def _envelope(sender: str, rcpts: list[str], body: bytes, utf8: bool) -> Envelope:
    env = Envelope(sender, rcpts)
    env.parse(b"Subject: machine\r\nX-Raw: \xfe\r\n\r\n" + body)
    env.smtputf8 = utf8
    env.client = {"ip": "127.0.0.1", "name": "machine.example"}
    return env


class Outcome:
    """What a call answered: its value, or the class of the exception it raised."""

    def __init__(self, value: Any = None, error: type[BaseException] | None = None) -> None:
        self.value = value
        self.error = error

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and (self.value, self.error) == (other.value, other.error)

    def __hash__(self) -> int:
        return hash(self.error)

    def __repr__(self) -> str:
        return f"Outcome({self.value!r}, {self.error!r})"


def _entry(entry: StoredMessage) -> tuple[Any, ...]:
    return (
        entry.envelope.to_bytes(),
        entry.attempts,
        entry.timestamp,
        entry.pending,
        entry.held,
        entry.last_reply.to_dict() if entry.last_reply else None,
        entry.original_recipients,
    )


class StorageMachine(RuleBasedStateMachine):
    """The backend made by ``backend_factory`` must answer as DictStorage does."""

    backend_factory: ClassVar[BackendFactory]

    messages = Bundle("messages")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = START
        self.env_db: dict[str, Any] = {}
        self.meta_db: dict[str, Any] = {}
        self.model: QueueStorage = self._model()
        self.backend = self.run(type(self).backend_factory())
        self.real = self.run(self.backend.open())
        self.to_model: dict[str, str] = {}  # real id -> model id

    def _model(self) -> DictStorage:
        return DictStorage(self.env_db, self.meta_db, lease_timeout=LEASE)

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        async def call() -> T:
            return await coro

        return self.loop.run_until_complete(call())

    def both(
        self, call: Callable[[QueueStorage, str], Awaitable[Any]], msg: tuple[str, str]
    ) -> Any:
        """Call on the model and on the backend (each with its own id); compare outcomes."""
        model_id, real_id = msg
        outcomes = []
        for store, id in ((self.model, model_id), (self.real, real_id)):
            try:
                outcomes.append(Outcome(self.run(call(store, id))))
            except (KeyError, ValueError) as exc:
                outcomes.append(Outcome(error=type(exc)))
        assert outcomes[0] == outcomes[1], f"model {outcomes[0]} != backend {outcomes[1]}"
        return outcomes[0].value

    def real_ids(self, ids: list[str]) -> list[str]:
        return sorted(self.to_model[i] for i in ids)

    def teardown(self) -> None:
        try:
            self.run(self.real.close())
            self.run(self.backend.destroy())
        finally:
            self.loop.close()

    # -- records -------------------------------------------------------------------------------

    @rule(target=messages, envelope=envelopes, delay=delays, claimed=st.booleans())
    def write(self, envelope: Envelope, delay: float, claimed: bool) -> tuple[str, str]:
        ts = self.now + delay
        model_id = self.run(self.model.write(envelope, ts, claimed=claimed))
        real_id = self.run(self.real.write(envelope, ts, claimed=claimed))
        self.to_model[real_id] = model_id
        return model_id, real_id

    @rule(msg=messages, delay=delays, reply=replies)
    def set_timestamp(self, msg: tuple[str, str], delay: float, reply: Reply | None) -> None:
        ts = self.now + delay
        self.both(lambda s, id: s.set_timestamp(id, ts, last_reply=reply), msg)

    @rule(msg=messages)
    def increment_attempts(self, msg: tuple[str, str]) -> None:
        self.both(lambda s, id: s.increment_attempts(id), msg)

    @rule(msg=messages, indexes=st.sets(st.integers(0, 4), max_size=3))
    def set_recipients_delivered(self, msg: tuple[str, str], indexes: set[int]) -> None:
        self.both(lambda s, id: s.set_recipients_delivered(id, iter(indexes)), msg)

    @rule(msg=messages, held=st.booleans())
    def set_held(self, msg: tuple[str, str], held: bool) -> None:
        self.both(lambda s, id: s.set_held(id, held), msg)

    @rule(msg=messages)
    def remove(self, msg: tuple[str, str]) -> None:
        self.both(lambda s, id: s.remove(id), msg)

    @rule(msg=consumes(messages))
    def remove_for_good(self, msg: tuple[str, str]) -> None:
        self.both(lambda s, id: s.remove(id), msg)
        self.both(lambda s, id: s.get(id), msg)

    @rule(msg=messages)
    def get_entry(self, msg: tuple[str, str]) -> None:
        async def entry(s: QueueStorage, id: str) -> tuple[Any, ...]:
            return _entry(await s.get_entry(id))

        self.both(entry, msg)

    # -- schedule ------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.0, 1.0, 10.0, LEASE, 120.0, 700.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def claim_due(self) -> None:
        model = sorted(self.run(self.model.claim(self.now, 10_000)))
        real = self.run(self.real.claim(self.now, 10_000))
        assert self.real_ids(real) == model, (self.real_ids(real), model, self.now)

    @rule(msgs=st.lists(messages, max_size=3))
    def renew(self, msgs: list[tuple[str, str]]) -> None:
        self.run(self.model.renew([m for m, _ in msgs], self.now))
        self.run(self.real.renew([r for _, r in msgs], self.now))

    @rule(msg=messages)
    def release(self, msg: tuple[str, str]) -> None:
        self.both(lambda s, id: s.release(id), msg)

    @rule(some=st.none() | st.lists(messages, max_size=3))
    def flush(self, some: list[tuple[str, str]] | None) -> None:
        model_ids = None if some is None else [m for m, _ in some]
        real_ids = None if some is None else [r for _, r in some]
        assert self.run(self.model.flush(self.now, model_ids)) == self.run(
            self.real.flush(self.now, real_ids)
        )

    @rule()
    def load(self) -> None:
        model = sorted(self.run(self.model.load()))
        real = sorted((ts, self.to_model[id]) for ts, id in self.run(self.real.load()))
        assert real == model

    @precondition(lambda self: bool(self.to_model))
    @rule()
    def reopen(self) -> None:
        """A restart: leases are lost, everything stored comes back."""
        self.run(self.real.close())
        self.real = self.run(self.backend.open())
        self.model = self._model()
        self.load()

    @invariant()
    def same_size(self) -> None:
        model = self.run(self.model.get_info())["size"]
        assert self.run(self.real.get_info())["size"] == model

    @invariant()
    def same_next_due(self) -> None:
        """Cheap enough to check after every step; catches a schedule gone astray early."""
        assert self.run(self.real.next_due()) == self.run(self.model.next_due())

    @rule(target=messages, n=st.integers(2, 6))
    def concurrent_writes(self, n: int) -> MultipleResults[tuple[str, str]]:
        """Writes that share one commit: each id must still be its own message."""
        envs = [_envelope("c@example.org", [f"c{i}@ex.net"], b"%d" % i, False) for i in range(n)]

        async def write_all(s: QueueStorage) -> list[str]:
            return list(await asyncio.gather(*(s.write(e, self.now) for e in envs)))

        model_ids = self.run(write_all(self.model))
        real_ids = self.run(write_all(self.real))
        self.to_model.update(zip(real_ids, model_ids, strict=True))
        return multiple(*zip(model_ids, real_ids, strict=True))
