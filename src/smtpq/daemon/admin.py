"""The operators' API: a small HTTP/1.1 server on a Unix socket (and optionally loopback TCP).

The Unix socket is protected by file permissions (0600, the daemon's user); a TCP listener
requires ``Authorization: Bearer <token>``. Every action is logged with who asked: the Unix
peer's uid (``by=uid:1000``, from SO_PEERCRED) or ``by=token``. One request per connection.
Lists are streamed as JSON lines, so that a queue of any size lists in bounded memory.

Routes (``ID`` is a queue id; selection bodies are ``{"ids": [...]}``, ``{"all": true}`` or a
filter such as ``{"recipient_domain": "example.com"}``):

=======  ========================  ====================================================
GET      /health                   ``{"status": "ok", "size": n}``
GET      /metrics                  Prometheus text format
GET      /queue                    one JSON object per line; filters as query parameters
GET      /queue/shape              qshape-like table (``?by=sender``)
GET      /queue/destinations       each destination: queued, in flight, window, state
                                   (``?scan=0``: without the queued counts)
GET      /queue/ID                 one message (``?body=1`` adds the message text)
POST     /queue/flush              attempt now (everything when nothing is selected)
POST     /queue/delete             remove without bouncing
POST     /queue/hold, /release     hold / release
POST     /queue/bounce             give up now, with a DSN
POST     /queue/requeue            store again as new
=======  ========================  ====================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from smtpq.daemon import ops
from smtpq.daemon.destinations import describe_destinations
from smtpq.daemon.metrics import Metrics
from smtpq.queue import Queue
from smtpq.storage.base import MessageInfo, is_valid_id

__all__ = [
    "AdminServer",
    "describe_message",
    "limited",
    "peer_identity",
    "run_action",
    "selector_from",
]

log = logging.getLogger("smtpq.admin")
_MAX_BODY = 1 << 20
_STREAM_BUFFER = 1 << 16
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HttpError(Exception):
    """An error answered with an HTTP status and a JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
}


def selector_from(params: dict[str, Any]) -> ops.MessageFilter | None:
    """A message filter from request parameters, or None when none is given."""
    keys = ("sender_domain", "recipient_domain", "min_age", "max_age", "state")
    given = {k: params[k] for k in keys if params.get(k) not in (None, "")}
    if not given:
        return None
    try:
        for age in ("min_age", "max_age"):
            if age in given:
                given[age] = ops.parse_age(str(given[age]))
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    if given.get("state") not in (None, "active", "deferred", "held"):
        raise HttpError(400, "state must be active, deferred or held")
    return ops.MessageFilter(**given)


async def describe_message(queue: Queue, id: str, body: bool) -> dict[str, Any]:
    """Everything about one message, for ``smtpq queue show``."""
    if not is_valid_id(id):
        raise KeyError(id)
    entry = await queue.store.get_entry(id)
    now = queue.clock.time()
    info = ops.message_summary(MessageInfo.from_entry(entry), now)
    env = entry.envelope
    pending = set(entry.pending)
    everyone = entry.original_recipients or tuple(env.recipients)
    info["recipient_status"] = [
        {"recipient": r, "status": "pending" if i in pending else "done"}
        for i, r in enumerate(everyone)
    ]
    info["client"] = env.client
    info["dsn"] = {"ret": env.dsn_ret, "envid": env.dsn_envid, "recipients": env.rcpt_params}
    head, text = env.flatten()
    info["headers"] = head.decode("utf-8", "replace")
    if body:
        info["body"] = text.decode("utf-8", "replace")
    return info


class AdminServer:
    """Serves the admin API for one queue."""

    def __init__(
        self,
        queue: Queue,
        metrics: Metrics,
        *,
        socket_path: Path | None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self._servers: list[asyncio.Server] = []
        self._socket_inode: int | None = None  # of the socket file this server made

    async def start(self) -> None:
        """Listen on the Unix socket (mode 0600) and the TCP address, if configured.

        A stale socket, left by a daemon that died, is replaced; one where a live process
        answers is left alone (a warning says so), so that starting never takes the socket of a
        running daemon: the workers of a shared (Redis) queue can be given the same path.
        """
        if self.socket_path is not None:
            path = self.socket_path
            path.parent.mkdir(parents=True, exist_ok=True)
            if await _answers(path):
                log.warning("admin socket %s is served by another process; not listening", path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(path.stat().st_mode):  # never another kind of file
                        path.unlink()
                old = os.umask(0o177)
                try:
                    server = await asyncio.start_unix_server(self._unix_client, path=str(path))
                finally:
                    os.umask(old)
                self._servers.append(server)
                self._socket_inode = path.stat().st_ino
        if self.tcp is not None:
            server = await asyncio.start_server(self._tcp_client, self.tcp[0], self.tcp[1])
            self._servers.append(server)

    async def stop(self) -> None:
        """Stop listening and remove the socket file (if it is still this server's)."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self.socket_path is not None and self._socket_inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.socket_path.stat().st_ino == self._socket_inode:
                    self.socket_path.unlink()
            self._socket_inode = None

    async def _unix_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._client(reader, writer, by=peer_identity(writer))

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._client(reader, writer, by=None)

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, by: str | None
    ) -> None:
        """Answer one request; ``by`` names a Unix socket's peer, None asks for the token."""
        try:
            async with asyncio.timeout(30):
                method, target, headers, body = await _read_request(reader)
            if by is None:
                given = headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not self.token or not hmac.compare_digest(given, self.token):
                    raise HttpError(401, "a valid admin token is required")
                by = "token"
            await self._route(method, target, body, writer, by)
        except HttpError as exc:
            await _respond_json(writer, exc.status, {"error": str(exc)})
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("admin request failed")
            with contextlib.suppress(Exception):
                await _respond_json(writer, 500, {"error": "internal error, see the daemon's log"})
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(
        self, method: str, target: str, body: bytes, writer: asyncio.StreamWriter, by: str
    ) -> None:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        queue, now = self.queue, self.queue.clock.time()
        if method == "GET":
            if path == "/health":
                info = await queue.store.get_info()
                await _respond_json(writer, 200, {"status": "ok", "size": info.get("size")})
            elif path == "/metrics":
                text = await self.metrics.render()
                await _respond(writer, 200, "text/plain; version=0.0.4; charset=utf-8", text)
            elif path == "/queue":
                limit = _int(query.get("limit"))
                stream = ops.iter_messages(queue.store, now, selector_from(query))
                await _respond_lines(writer, limited(stream, limit))
            elif path == "/queue/shape":
                by = query.get("by", "recipient")
                if by not in ("recipient", "sender"):
                    raise HttpError(400, "by must be recipient or sender")
                shape = await ops.shape(ops.iter_messages(queue.store, now), now, by)
                await _respond_json(writer, 200, shape.to_dict(top=_int(query.get("top")) or 3))
            elif path == "/queue/destinations":
                scan = query.get("scan", "1") != "0"
                store = queue.destination_store
                data = await describe_destinations(queue, queue.relay, store, scan=scan)
                await _respond_json(writer, 200, data)
            elif path.startswith("/queue/"):
                try:
                    info = await describe_message(queue, path[7:], query.get("body") == "1")
                except KeyError:
                    raise HttpError(404, f"no message {path[7:]!r} in the queue") from None
                await _respond_json(writer, 200, info)
            else:
                raise HttpError(404, "no such resource")
            return
        if method != "POST":
            raise HttpError(405, "use GET or POST")
        action = path.removeprefix("/queue/")
        if action not in ("flush", "delete", "hold", "release", "bounce", "requeue"):
            raise HttpError(404, "no such action")
        params = _json_body(body)
        result = await run_action(queue, action, params, by)
        await _respond_json(writer, 200, result)


async def run_action(
    queue: Queue, action: str, params: dict[str, Any], by: str, *, stored: bool = False
) -> dict[str, Any]:
    """Carry out an operator action on the messages ``params`` select, logged with ``by``.

    ``stored``: no daemon runs this disk queue, so a flush writes each message's new time (see
    :func:`ops.flush`). A flush with no selection flushes everything (``postqueue -f``); the
    other actions need ids, a filter, or ``all``.
    """
    now = queue.clock.time()
    ids = params.get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise HttpError(400, "ids must be a list of queue ids")
    selector = selector_from(params)
    if ids is None and selector is None and not params.get("all") and action != "flush":
        raise HttpError(400, "name the messages: ids, a filter, or all")
    if action == "flush" and ids is None and selector is None:
        return {"count": await ops.flush(queue, None, by, stored=stored)}
    chosen = await ops.select_ids(queue.store, now, selector, ids)
    if action == "flush":
        return {"count": await ops.flush(queue, chosen, by, stored=stored)}
    if action == "delete":
        return {"count": await ops.delete(queue, chosen, by)}
    if action in ("hold", "release"):
        return {"count": await ops.hold(queue, chosen, action == "hold", by)}
    if action == "bounce":
        return {"count": await ops.bounce_now(queue, chosen, by)}
    new_ids = await ops.requeue(queue, chosen, by)
    await queue.flush(new_ids)
    return {"count": len(new_ids), "ids": new_ids}


def peer_identity(writer: asyncio.StreamWriter) -> str:
    """Who is at the other end of a Unix socket: ``uid:N`` from the kernel (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:  # not Linux: the socket's permissions still apply
        return "unix"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return "unix"
    _pid, uid, _gid = _PEERCRED.unpack(creds)
    return f"uid:{uid}"


async def _answers(path: Path) -> bool:
    """Whether a server listens on the Unix socket ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _int(text: str | None) -> int | None:
    if text in (None, ""):
        return None
    try:
        value = int(text)
    except ValueError:
        raise HttpError(400, f"not a number: {text!r}") from None
    if value < 0:
        raise HttpError(400, "numbers must not be negative")
    return value


def _json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise HttpError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return data


async def limited(
    stream: AsyncIterator[dict[str, Any]], limit: int | None
) -> AsyncIterator[dict[str, Any]]:
    """The first ``limit`` items of ``stream`` (all when None)."""
    count = 0
    async for item in stream:
        if limit is not None and count >= limit:
            break
        count += 1
        yield item


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    line = (await reader.readuntil(b"\r\n")).decode("latin-1").strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HttpError(400, "bad request line")
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readuntil(b"\r\n")
        if raw in (b"\r\n", b"\n"):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
        if len(headers) > 100:
            raise HttpError(400, "too many headers")
    length = int(headers.get("content-length", "0") or 0)
    if length > _MAX_BODY:
        raise HttpError(413, "request body too large")
    body = await reader.readexactly(length) if length else b""
    return parts[0].upper(), parts[1], headers, body


async def _respond(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


async def _respond_json(writer: asyncio.StreamWriter, status: int, data: Any) -> None:
    await _respond(writer, status, "application/json", json.dumps(data).encode() + b"\n")


async def _respond_lines(
    writer: asyncio.StreamWriter, items: AsyncIterator[dict[str, Any]]
) -> None:
    """Stream JSON lines; the end of the body is the end of the connection.

    Lines go out in blocks of about _STREAM_BUFFER bytes (a write per line would be a system
    call per message), and only while the client keeps up: memory stays bounded.
    """
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n"
    )
    block: list[str] = []
    size = 0
    async for item in items:
        line = json.dumps(item)
        block.append(line)
        size += len(line) + 1
        if size >= _STREAM_BUFFER:
            writer.write(("\n".join(block) + "\n").encode())
            block, size = [], 0
            await writer.drain()
    if block:
        writer.write(("\n".join(block) + "\n").encode())
    await writer.drain()
