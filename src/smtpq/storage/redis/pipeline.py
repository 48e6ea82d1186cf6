"""Automatic pipelining: the calls that arrive together go to Redis in one round trip per node.

A Queue runs many attempts and enqueues at once; sending each call alone would cost a round trip
and a pool checkout apiece. Calls wait while a batch is on the wire and go with the next one;
another batch is sent alongside only when a full one is waiting. The batch is split by the node
that serves each call's slot (one node on a single server), and each node's share goes in one
write on one connection, in order:

* with ``wait_replicas``, a share holding a write ends with one ``WAIT``: a group commit;
* the announcements of the calls that ask for one (``notice``) follow them: one per shard
  and share on a cluster, one per share on a server (see :mod:`smtpq.storage.redis.wake`),
  so that a worker woken by one sees the changes;
* a call answered ``MOVED`` goes to the new master with the next batch (the slot map is
  patched), ``ASK`` to the importing node behind ``ASKING``, ``NOSCRIPT`` again as ``EVAL``
  (which loads the script on that node), ``TRYAGAIN`` (a multi-key script on a slot being
  migrated) again after a short pause;
* a node that fails (connection lost: it died, restarts or fails over; ``CLUSTERDOWN``) makes
  the cluster's topology be read again, and its calls are sent again after a growing pause.

A call keeps trying for its ``patience``: about a second for a write (the client is waiting:
better a 451 and another shard), a claim or a read, :data:`PATIENCE` for the bookkeeping of an
attempt (which is otherwise put off for a minute by the Queue); then it raises
:class:`~smtpq.errors.QueueError`.

Calls to send again wait aside, so that the calls to healthy nodes are never held up by them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.typing import EncodableT

from smtpq.errors import QueueError
from smtpq.storage.redis.route import Route
from smtpq.storage.redis.scripts import Script

__all__ = ["PATIENCE", "READ_PATIENCE", "Announcer", "Pipeline", "pack"]

log = logging.getLogger(__name__)

#: Turns the announcements of one node's share (shard -> the earliest time its calls may have
#: made it due) into the commands that publish them.
Announcer = Callable[[dict[int, float]], list[bytes]]

#: Seconds a script call keeps trying by default: longer than a slot takes to move in a
#: resharding, and than a failover of a master (with a short ``cluster-node-timeout``).
PATIENCE = 10.0
#: Seconds a read keeps trying.
READ_PATIENCE = 1.0
_REDIRECTS = 16  # MOVED / ASK answers followed for one call before giving up


def pack(*args: EncodableT) -> bytes:
    """One command in the Redis protocol (RESP); redis-py's general packer costs more."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            data = bytes(arg)
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


_ASKING = pack(b"ASKING")


@dataclass(slots=True, eq=False)
class _Call:
    slot: int
    script: Script | None  # None: args is a plain command
    numkeys: int
    args: tuple[EncodableT, ...]
    replicate: bool
    future: asyncio.Future[Any]
    patience: float  # seconds it keeps trying (a node failing, a slot being migrated)
    notice: tuple[int, float] | None  # announce that this shard may be due at this time
    started: float = field(default_factory=time.monotonic)
    ask: Any = None  # the node an ASK named, for the next round only
    full: bool = False  # the node lacks the script: send its text
    failures: int = 0  # rounds in which its node failed
    redirects: int = 0
    error: BaseException | None = None

    def packed(self) -> bytes:
        if self.script is None:
            return pack(*self.args)
        if self.full:
            return pack(b"EVAL", self.script.text, self.numkeys, *self.args)
        return pack(b"EVALSHA", self.script.sha, self.numkeys, *self.args)


async def _exchange(conn: Any, commands: list[bytes]) -> list[Any]:
    """Send commands in one write and read every reply; an error reply is returned in place."""
    await conn.send_packed_command(commands, check_health=False)
    results: list[Any] = []
    for _ in commands:
        try:
            results.append(await conn.read_response())
        except ResponseError as exc:
            results.append(exc)
    return results


class Pipeline:
    """Sends script calls and commands in batches over a :class:`Route`.

    :param announcer: makes the commands that publish a share's announcements.
    :param wait_replicas: with > 0, every share of a batch that holds a call made with
        ``replicate=True`` ends with ``WAIT wait_replicas wait_timeout``.
    """

    def __init__(
        self,
        route: Route,
        announcer: Announcer,
        wait_replicas: int,
        wait_timeout: float,
        max_batch: int = 256,
    ) -> None:
        self._route = route
        self._announcer = announcer
        self._wait = (wait_replicas, int(wait_timeout * 1000))
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._sending = 0  # senders draining the queue (a task's done-callback comes too late)
        self._tasks: set[asyncio.Task[None]] = set()

    def run(
        self,
        script: Script,
        slot: int,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        *,
        replicate: bool = False,
        patience: float = PATIENCE,
        notice: tuple[int, float] | None = None,
    ) -> asyncio.Future[Any]:
        """Run ``script`` on the node serving ``slot``: its reply, or, with ``replicate``,
        ``(reply, how many replicas acknowledged the batch)``.

        With ``notice`` (a shard, and a time), the other workers are told after the call that
        the shard may be due at that time. The future raises :class:`~smtpq.errors.QueueError`
        when Redis fails (its node failed for about a second, or its slot stayed busy for
        ``patience`` seconds) or the script raises.
        """
        call = _Call(
            slot, script, len(keys), (*keys, *args), replicate, self._new(), patience, notice
        )
        return self._enqueue(call)

    def command(self, slot: int, *args: EncodableT) -> asyncio.Future[Any]:
        """Run a plain command (a read) on the node serving ``slot``: its raw reply."""
        return self._enqueue(_Call(slot, None, 0, args, False, self._new(), READ_PATIENCE, None))

    async def join(self) -> None:
        """Wait until every call made so far has been answered."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    def _new() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _enqueue(self, call: _Call) -> asyncio.Future[Any]:
        self._queue.append(call)
        self._start()
        return call.future

    def _start(self) -> None:
        if not self._sending or (len(self._queue) >= self._max_batch and self._sending < 4):
            self._sending += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let the calls made in this turn of the loop join the batch
            while self._queue:
                batch = [c for c in self._queue[: self._max_batch] if not c.future.done()]
                del self._queue[: self._max_batch]
                if batch:
                    await self._send(batch)
        finally:
            self._sending -= 1

    async def _send(self, batch: list[_Call]) -> None:
        try:
            again, pause = await self._round(batch)
        except Exception as exc:  # a bug here must not leave callers waiting for ever
            log.exception("a batch of redis calls failed unexpectedly")
            self._fail(batch, f"redis batch failed: {exc!r}")
            return
        except BaseException:
            for call in batch:
                call.future.cancel()
            raise
        if again:
            # Sent again with a later batch, so that the calls to healthy nodes are not held up.
            task = asyncio.get_running_loop().create_task(self._later(again, pause))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _later(self, calls: list[_Call], pause: float) -> None:
        await asyncio.sleep(pause)
        self._queue.extend(c for c in calls if not c.future.done())
        self._start()

    async def _round(self, pending: list[_Call]) -> tuple[list[_Call], float]:
        """Send each node its share; the calls to send again, and the pause before."""
        route = self._route
        try:
            await route.ready()
            shares: dict[Any, list[_Call]] = {}
            for call in pending:
                node = call.ask if call.ask is not None else route.node(call.slot)
                shares.setdefault(node, []).append(call)
        except (RedisError, RedisClusterException, OSError) as exc:
            await route.recover(None)
            return self._failed(pending, exc), self._backoff(pending)
        nodes = list(shares)
        results = await asyncio.gather(
            *(self._share(node, shares[node]) for node in nodes), return_exceptions=True
        )
        again: list[_Call] = []
        pause = 0.0
        for node, result in zip(nodes, results, strict=True):
            calls = shares[node]
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, Exception):
                if not isinstance(result, RedisError | RedisClusterException | OSError):
                    raise result
                await route.recover(node)
                failed = self._failed(calls, result)
                again += failed
                pause = max(pause, self._backoff(failed))
                continue
            assert isinstance(result, list)
            for call, reply in zip(calls, result, strict=True):
                wait = await self._judge(call, reply, node)
                if wait is not None:
                    again.append(call)
                    pause = max(pause, wait)
        return again, pause

    @staticmethod
    def _backoff(calls: list[_Call]) -> float:
        failures = max((c.failures for c in calls), default=1)
        return min(0.5, 0.02 * 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)

    def _failed(self, calls: list[_Call], exc: BaseException) -> list[_Call]:
        """Calls whose node failed: to send again, or answered QueueError when their patience
        has run out."""
        again = []
        for call in calls:
            call.error, call.ask = exc, None
            call.failures += 1
            if time.monotonic() - call.started < call.patience:
                again.append(call)
            else:
                self._settle(call, QueueError(f"redis failed: {exc}"))
        return [c for c in again if not c.future.done()]

    async def _judge(self, call: _Call, reply: Any, node: Any) -> float | None:
        """Settle the call with its reply, or say after what pause it must be sent again."""
        if not isinstance(reply, Exception):
            self._settle(call, reply)
            return None
        call.error = reply
        pause = 0.0
        if isinstance(reply, MovedError):
            await self._route.moved(reply)
            call.ask = None
            call.redirects += 1
        elif isinstance(reply, AskError):
            call.ask = self._route.redirected(reply)
            call.redirects += 1
            if call.ask is None:
                await self._route.recover(None)  # a node we do not know yet: read the topology
        elif isinstance(reply, ClusterDownError | ReadOnlyError):
            # A failover under way, or a stale slot map: as if the node had failed.
            call.ask = None
            await self._route.recover(node)
            return self._backoff(self._failed([call], reply)) if not call.future.done() else None
        elif isinstance(reply, NoScriptError):
            call.full = True
        elif isinstance(reply, TryAgainError):
            # A multi-key script on a slot being migrated: wait until the migration is done.
            pause = random.uniform(0.01, 0.05)
            if time.monotonic() - call.started > call.patience:
                self._settle(call, QueueError(f"redis slot busy for too long: {reply}"))
                return None
        else:
            self._settle(call, QueueError(f"redis script failed: {reply}"))
            return None
        if call.redirects > _REDIRECTS:
            self._settle(call, QueueError(f"redis redirected too often: {reply}"))
            return None
        return None if call.future.done() else pause

    async def _share(self, node: Any, calls: list[_Call]) -> list[Any]:
        """One node's share of a round in one write; the replies of ``calls``, in order."""
        commands = []
        notices: dict[int, float] = {}
        for call in calls:
            if call.ask is not None:
                commands.append(_ASKING)  # applies to the next command, on this connection
            commands.append(call.packed())
            if call.notice is not None:
                shard, due = call.notice
                notices[shard] = min(due, notices.get(shard, due))
        announcements = self._announcer(notices) if notices else []
        commands += announcements
        replicas, wait_ms = self._wait
        replicate = replicas > 0 and any(c.replicate for c in calls)
        if replicate:
            # WAIT counts the replicas that have this connection's writes: the whole share.
            commands.append(pack(b"WAIT", replicas, wait_ms))
        replies = await self._route.exchange(node, lambda conn: _exchange(conn, commands))
        acked = int(replies.pop()) if replicate else 0
        answers = iter(replies)
        out: list[Any] = []
        for call in calls:
            if call.ask is not None:
                next(answers)  # ASKING's +OK
            reply = next(answers)
            if call.replicate and replicate and not isinstance(reply, Exception):
                reply = (reply, acked)
            out.append(reply)
        return out

    @staticmethod
    def _settle(call: _Call, outcome: Any) -> None:
        if call.future.done():
            return  # its caller was cancelled
        if isinstance(outcome, BaseException):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome)

    def _fail(self, batch: list[_Call], why: str) -> None:
        for call in batch:
            self._settle(call, QueueError(why))
