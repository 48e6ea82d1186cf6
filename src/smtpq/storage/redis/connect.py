"""Making the route to Redis from RedisStorage's arguments: a server (host, URL, unix socket) or
a cluster (any node's host or URL seeds the topology)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from smtpq.storage.redis.route import ClusterRoute, Route, ServerRoute

__all__ = ["route_for", "route_from_url", "route_of"]


def _options(kwargs: dict[str, Any], cluster: bool) -> dict[str, Any]:
    """redis-py connection options, with this storage's defaults.

    On a server: a short retry, so that an outage becomes a 451 in about a second; a bounded
    pool that makes callers wait (``timeout`` seconds at most) for a free connection rather than
    fail when many attempts run at once. On a cluster the storage retries itself, per round
    (see :mod:`smtpq.storage.redis.pipeline`), and each node has its own pool.
    """
    kwargs = dict(kwargs)
    kwargs.setdefault("max_connections", 64)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    if cluster:
        for server_only in ("timeout", "unix_socket_path"):
            if server_only in kwargs:
                raise ValueError(f"{server_only!r} is not an option on a Redis Cluster")
        return kwargs
    kwargs.setdefault("timeout", 10.0)
    kwargs.setdefault("retry", Retry(EqualJitterBackoff(cap=0.5, base=0.02), 3))
    kwargs.setdefault("retry_on_error", [RedisConnectionError, RedisTimeoutError])
    return kwargs


def route_for(
    host: str,
    port: int,
    db: int,
    password: str | None,
    socket_timeout: float | None,
    cluster: bool,
    kwargs: dict[str, Any],
) -> Route:
    """The route to a server (or, with ``cluster``, to the cluster it belongs to)."""
    options = _options(kwargs, cluster)
    if cluster:
        if db:
            raise ValueError("a Redis Cluster has only database 0")
        client = RedisCluster(
            host=host, port=port, password=password, socket_timeout=socket_timeout, **options
        )
        return ClusterRoute(client)
    path = options.pop("unix_socket_path", None)
    if path is not None:
        options.update(connection_class=aioredis.UnixDomainSocketConnection, path=path)
    else:
        options.update(host=host, port=port)
        if options.pop("ssl", False):
            options["connection_class"] = aioredis.SSLConnection
    pool = aioredis.BlockingConnectionPool(
        db=db, password=password, socket_timeout=socket_timeout, **options
    )
    return ServerRoute(aioredis.Redis.from_pool(pool))


def route_from_url(url: str, cluster: bool, kwargs: dict[str, Any]) -> Route:
    """The route to the server (or cluster) that a ``redis://``, ``rediss://`` or ``unix://``
    URL names."""
    options = _options(kwargs, cluster)
    if cluster:
        return ClusterRoute(RedisCluster.from_url(url, **options))
    pool = aioredis.BlockingConnectionPool.from_url(url, **options)
    return ServerRoute(aioredis.Redis.from_pool(pool))


def route_of(client: aioredis.Redis | RedisCluster) -> Route:
    """The route through a client made by the caller."""
    if isinstance(client, RedisCluster):
        return ClusterRoute(client)
    return ServerRoute(client)
