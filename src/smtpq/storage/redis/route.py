"""Where a command goes: the one Redis server, or the cluster node that serves its slot.

A *route* hands out connections per node and says what to do when a node fails. The pipeline
(:mod:`smtpq.storage.redis.pipeline`) is the same for both; only the route differs:

* :class:`ServerRoute` — one Redis server, one connection pool; a broken connection is first
  retried by the pool's own ``retry`` policy, and a node never redirects.
* :class:`ClusterRoute` — redis-py's asyncio cluster client supplies the topology (which master
  serves which slot) and one connection pool per node; ``MOVED`` updates the slot map, a broken
  node makes the topology be read again before the next round.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError

__all__ = ["ClusterRoute", "Route", "ServerRoute"]


class Route(abc.ABC):
    """Connections to the node that serves a slot."""

    @abc.abstractmethod
    async def ready(self) -> None:
        """Learn the topology, once (connections are made when first used)."""

    @abc.abstractmethod
    def node(self, slot: int) -> Any:
        """The node (hashable) serving ``slot``.

        :raises RedisError: when no node is known to serve it.
        """

    @abc.abstractmethod
    def redirected(self, error: AskError) -> Any:
        """The node an ``ASK`` redirection names (None when it is not known yet)."""

    @abc.abstractmethod
    async def exchange(self, node: Any, run: Callable[[Any], Awaitable[list[Any]]]) -> list[Any]:
        """Run ``run(connection)`` on a connection to ``node``."""

    async def moved(self, error: AskError) -> None:  # noqa: B027 - a server never redirects
        """A ``MOVED`` answer: the slot is served elsewhere from now on."""

    async def recover(self, node: Any) -> None:  # noqa: B027 - the pool retries by itself
        """``node`` failed (connection lost, cluster down): prepare the next round."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection."""


class ServerRoute(Route):
    """Everything goes to one Redis server through ``client``'s connection pool."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def ready(self) -> None:
        """Nothing to learn: one server serves every slot."""

    def node(self, slot: int) -> Any:
        """The one server."""
        return None

    def redirected(self, error: AskError) -> Any:
        """Never: a server does not redirect."""
        return None

    async def exchange(self, node: Any, run: Callable[[Any], Awaitable[list[Any]]]) -> list[Any]:
        """Run on a pooled connection, retried by its pool's policy on a broken connection."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            result: list[Any] = await conn.retry.call_with_retry(
                lambda: run(conn), lambda _: conn.disconnect()
            )
            return result
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        """Close the client and its pool."""
        await self.client.aclose()


class ClusterRoute(Route):
    """Commands go to the master serving their slot, as redis-py's cluster client knows it."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client
        self._stale = False

    async def ready(self) -> None:
        """Read the topology from the seed nodes (once, then after failures)."""
        if self._stale:
            self._stale = False
            await self.client.nodes_manager.initialize()
        await self.client.initialize()

    def node(self, slot: int) -> ClusterNode:
        """The master of ``slot`` in the slot map."""
        return self.client.nodes_manager.get_node_from_slot(slot)

    def redirected(self, error: AskError) -> ClusterNode | None:
        """The node named by an ``ASK`` (a slot being migrated to it)."""
        return self.client.nodes_manager.get_node(host=error.host, port=error.port)

    async def exchange(self, node: Any, run: Callable[[Any], Awaitable[list[Any]]]) -> list[Any]:
        """Run on one of ``node``'s connections; a broken one is dropped, not retried here."""
        conn = node.acquire_connection()
        try:
            if conn.should_reconnect():
                await conn.disconnect()
            try:
                return await run(conn)
            except BaseException:
                # The replies of this exchange may still be on their way: never reuse it.
                await conn.disconnect()
                raise
        finally:
            node.release(conn)

    async def moved(self, error: AskError) -> None:
        """Patch the slot map with the node that ``MOVED`` named."""
        await self.client.nodes_manager.move_slot(error)

    async def recover(self, node: Any) -> None:
        """Drop the node's idle connections; read the topology again before the next round."""
        if isinstance(node, ClusterNode):
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()
        self._stale = True

    async def close(self) -> None:
        """Close every node's connections."""
        await self.client.aclose()
