"""The edge's listening sockets, accepted from by the edge itself rather than by the event loop.

Neither loop's own accept handling is right for a server facing the Internet when the process
runs out of file descriptors (EMFILE, ENFILE on ``accept``):

- asyncio's ``create_server`` logs the error with its traceback (for each connection waiting,
  up to the backlog), stops accepting for a second and tries again, logging again each time;
- uvloop (libuv) closes a spare descriptor, then accepts and closes every waiting connection
  without a word to the client, and goes on as if nothing happened, silently.

Here, on running out of descriptors, accepting pauses: the waiting clients stay in the kernel's
backlog (they get their greeting once there is room) and accepting resumes when a session of
this edge closes, or after :data:`RETRY_DELAY` (descriptors freed elsewhere); one log line says
so (at most one a minute). Nothing loops meanwhile. Accepted sockets are handed to the loop
with ``connect_accepted_socket``, which both loops implement.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

__all__ = ["RETRY_DELAY", "Listener", "bind"]

log = logging.getLogger("smtpq.edge")

#: Seconds before accepting is tried again when descriptors ran out and no session has closed.
RETRY_DELAY: Final = 1.0
#: Connections accepted per wake-up at most, so that a flood does not starve the sessions.
_BATCH: Final = 64
_BACKLOG: Final = 128
_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind(host: str | None, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening, non-blocking sockets for ``host`` (a name may give several addresses; empty:
    every interface) and ``port``, as ``loop.create_server`` makes them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, *address[:2]) in seen:
                continue
            seen.add((family, *address[:2]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Each family has its own socket, as asyncio does: no v4-mapped duplicates.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """Accepts from ``sockets`` and hands each connection to ``accepted(sock, address)`` (a
    socket in blocking mode, as ``accept`` makes it).

    :ivar paused: accepting is paused for want of descriptors.
    :ivar pauses: how many times it was.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        accepted: Callable[[socket.socket, Any], None],
    ) -> None:
        self.sockets = sockets
        self._accepted = accepted
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._logged: float | None = None
        self._serving = False
        self.paused = False
        self.pauses = 0

    def start(self) -> None:
        """Start accepting."""
        self._serving = True
        self._watch()

    def close(self) -> None:
        """Stop accepting and close the sockets."""
        self._serving = False
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
        for sock in self.sockets:
            sock.close()

    def resume(self) -> None:
        """A descriptor may be free (a session closed): accept again if paused."""
        if self.paused and self._serving:
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            self.paused = False
            self._watch()

    def _watch(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    def _unwatch(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while in the backlog
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                else:  # a listening socket that fails otherwise is worth knowing about
                    log.error("accept on %s failed: %s", sock.getsockname(), exc)
                return
            # Left blocking: the loop makes the sockets it is given non-blocking itself.
            self._accepted(conn, address)

    def _pause(self, exc: OSError) -> None:
        self.paused = True
        self.pauses += 1
        self._unwatch()
        self._retry = self._loop.call_later(RETRY_DELAY, self.resume)
        now = self._loop.time()
        if self._logged is None or now - self._logged >= 60.0:
            self._logged = now
            log.warning(
                "out of file descriptors (%s): accepting paused until a connection closes; "
                "raise the process's limit (ulimit -n) or lower max_connections",
                exc.strerror,
            )
