"""Wake-ups: the announcements of changes that may make work due, as other workers publish them.

An announcement is one pub/sub message per batch of changes: ``<sender> <shard>:<due> ...``
(the sending storage object's token, then each shard changed and its due time afterwards). It
is published with the change's batch (see :mod:`smtpq.storage.redis.pipeline`), after it.

* On one Redis server: classic pub/sub on the queue's channel ``<prefix>{<tag>}:wake`` — one
  subscription per worker, one message per batch.
* On a cluster: sharded pub/sub (``SPUBLISH``, Redis 7) on each shard's channel
  ``<prefix>{<shard tag>}:wake``, which stays on the master (and replicas) serving that shard
  instead of being broadcast over the whole cluster bus as classic pub/sub is. A worker holds
  one subscription per master, to the channels of the shards that master serves.

When a subscription is lost (a node died or failed over, a slot moved: Redis then unsubscribes
the shard's channel), every subscription is made again from a fresh view of the topology, and
the storage is told that announcements may have been missed (it then reads every shard's due
time again, and wakes its waiters).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

__all__ = ["ClusterListener", "Listener", "ServerListener"]

log = logging.getLogger(__name__)

#: Called with the data of every announcement.
OnMessage = Callable[[bytes], None]
#: Called once subscribed again: announcements made meanwhile were missed.
OnGap = Callable[[], None]

_IDLE = 30.0  # seconds without a message before the subscription is pinged


class _Lost(Exception):
    """A subscription ended: Redis unsubscribed us (the slot moved) or did not answer."""


class Listener(abc.ABC):
    """Keeps subscriptions to the wake channels, reconnecting with backoff, until closed."""

    def __init__(self, on_message: OnMessage, on_gap: OnGap) -> None:
        self._on_message = on_message
        self._on_gap = on_gap
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            # Python 3.11's wait_for (used inside redis-py) can swallow a cancellation that
            # arrives just as its operation completes: insist until the task has ended.
            await asyncio.wait([task], timeout=0.1)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._listen(self._subscribed)
            except (RedisError, RedisClusterException, OSError, _Lost) as exc:
                log.warning("redis wake-up subscription lost (%s); retrying in %.2fs", exc, delay)
            except Exception:  # a bug here must not end the wake-ups for good
                log.exception("redis wake-up subscription failed; retrying in %.2fs", delay)
            # Whatever was announced while we were away is lost: let waiters look again.
            self._on_gap()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            self._retrying()

    def _subscribed(self) -> None:
        self._on_gap()  # announcements made before the subscription took effect were missed

    @abc.abstractmethod
    async def _listen(self, subscribed: Callable[[], None]) -> None:
        """Subscribe, call ``subscribed`` once every subscription stands, relay messages
        until a subscription is lost (raise)."""

    def _retrying(self) -> None:  # noqa: B027 - only the cluster listener has to relearn
        """About to subscribe again."""

    async def _relay(self, pubsub: Any, kinds: Sequence[str], gone: str | None) -> None:
        """Pass on each message of the ``kinds``; ping when idle, to detect a dead link."""
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=_IDLE)
            if message is None:
                if pinged:
                    raise _Lost("no answer to ping on the wake-up subscription")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            kind = message["type"]
            if kind in kinds and isinstance(message["data"], bytes):
                self._on_message(message["data"])
            elif kind == gone:
                raise _Lost(f"unsubscribed from {message['channel']!r} by the server")


class ServerListener(Listener):
    """Classic pub/sub on one channel of one Redis server."""

    def __init__(
        self, client: aioredis.Redis, channel: str, on_message: OnMessage, on_gap: OnGap
    ) -> None:
        super().__init__(on_message, on_gap)
        self._client = client
        self._channel = channel

    async def _listen(self, subscribed: Callable[[], None]) -> None:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            confirm = await pubsub.get_message(timeout=10.0)
            if confirm is None or confirm["type"] != "subscribe":
                raise _Lost(f"no subscription confirmed: {confirm!r}")
            subscribed()
            await self._relay(pubsub, ("message",), None)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()


class ClusterListener(Listener):
    """Sharded pub/sub: one subscription per master, to its shards' channels.

    :param channels: each shard's wake channel and its slot.
    """

    def __init__(
        self,
        client: RedisCluster,
        channels: Callable[[], Sequence[tuple[int, str]]],
        on_message: OnMessage,
        on_gap: OnGap,
    ) -> None:
        super().__init__(on_message, on_gap)
        self._client = client
        self._channels = channels
        self._relearn = False

    def _retrying(self) -> None:
        self._relearn = True

    async def _listen(self, subscribed: Callable[[], None]) -> None:
        if self._relearn:
            self._relearn = False
            await self._client.nodes_manager.initialize()
        await self._client.initialize()
        by_node: dict[ClusterNode, list[str]] = {}
        for slot, channel in self._channels():
            node = self._client.nodes_manager.get_node_from_slot(slot)
            by_node.setdefault(node, []).append(channel)
        waiting = len(by_node)

        def ready() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                subscribed()

        tasks = [
            asyncio.create_task(self._node(node, channels, ready))
            for node, channels in by_node.items()
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
            raise _Lost("a subscription ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _node(
        self, node: ClusterNode, channels: list[str], ready: Callable[[], None]
    ) -> None:
        """Subscribe to ``channels`` on ``node`` (one SSUBSCRIBE each: each is in its own
        slot) and relay their messages."""
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
        )
        client = aioredis.Redis.from_pool(pool)
        pubsub = client.pubsub()
        try:
            for channel in channels:
                await pubsub.ssubscribe(channel)
            confirmed = 0
            while confirmed < len(channels):
                message = await pubsub.get_message(timeout=10.0)
                if message is None:
                    raise RedisConnectionError(f"no subscription confirmed by {node.name}")
                if message["type"] == "ssubscribe":
                    confirmed += 1
                elif message["type"] == "smessage" and isinstance(message["data"], bytes):
                    self._on_message(message["data"])
            ready()
            await self._relay(pubsub, ("smessage",), "sunsubscribe")
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
