"""systemd's readiness protocol (``sd_notify``) without libsystemd: one datagram per state.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket (a path, or an
abstract name written with a leading ``@``), and waits for ``READY=1`` before it calls the
service started. ``RELOADING=1`` (with the monotonic time, as ``Type=notify-reload`` requires)
and ``STOPPING=1`` tell it about reloads and shutdowns. Without the variable every call is a
no-op, so the daemon needs no flag to run outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


class Notifier:
    """Sends state changes to the service manager named by ``$NOTIFY_SOCKET``, if any."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get(ENV) or None

    @classmethod
    def from_environment(cls) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, removed from the environment so that the
        processes this one starts (workers) do not speak to the service manager themselves."""
        return cls(os.environ.pop(ENV, None) or None)

    def ready(self, status: str | None = None) -> None:
        """Started (or finished reloading): ``READY=1``."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        """A reload began; :meth:`ready` follows when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """A graceful shutdown began."""
        self.send("STOPPING=1")

    def send(self, *assignments: str) -> None:
        """One datagram of ``KEY=value`` lines; a failure is logged, never raised (the
        daemon runs on whether or not its manager hears it)."""
        if not self.address:
            return
        address = self.address
        if address.startswith("@"):  # an abstract socket: a leading NUL byte
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), address)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.address, exc)
