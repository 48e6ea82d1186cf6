"""Postfix's ``smtp-sink`` as a test peer on a free loopback port, each transaction dumped to
a file (``-d``): the MAIL and RCPT arguments it was given, and the message as it arrived.

It advertises PIPELINING, 8BITMIME, AUTH (accepting any password), ENHANCEDSTATUSCODES and
DSN; flags turn them off (``-p``, ``-8``, ``-a``, ``-E``, ``-N``) or make commands fail (``-f``,
``-r``, ``-Q``): see ``man smtp-sink``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Where Debian and others install it (with Postfix).
SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/lib/postfix/sbin")


@dataclass(frozen=True)
class Dump:
    """One transaction smtp-sink took."""

    mail_args: str
    rcpt_args: list[str]
    #: The message as smtp-sink wrote it: dot-stuffing undone, lines ending in LF.
    message: bytes


class PostfixSink:
    """``smtp-sink FLAGS -d DIR/... 127.0.0.1:PORT``, started and stopped by pid."""

    def __init__(self, directory: Path, *flags: str) -> None:
        self.directory = directory
        self.flags = flags
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self, port: int) -> PostfixSink:
        assert SMTP_SINK is not None
        self.port = port
        # As root, smtp-sink insists on a user to switch to: the one it runs as.
        user = ["-u", pwd.getpwuid(os.geteuid()).pw_name] if os.geteuid() == 0 else []
        template = str(self.directory / "%Y%m%d%H%M%S.")
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - starts at once; waited for below
            [SMTP_SINK, *user, *self.flags, "-d", template, f"127.0.0.1:{port}", "64"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        async with asyncio.timeout(10):
            while True:
                if self._proc.poll() is not None:
                    _, err = self._proc.communicate()
                    raise RuntimeError(f"smtp-sink exited: {err.decode(errors='replace')}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                return self

    def dumps(self) -> list[Dump]:
        """The transactions whose content was taken, in no particular order (smtp-sink opens
        a dump at MAIL: one with no content, or not ended yet, is left out)."""
        found = []
        for path in sorted(self.directory.iterdir()):
            head, received, rest = path.read_bytes().partition(b"\nReceived: ")
            if not received or not rest.endswith(b"\n\n"):
                continue
            fields = [line.split(b": ", 1) for line in head.split(b"\n")]
            message = rest.split(b"\n", 3)[3]  # after the three lines of its Received:
            found.append(
                Dump(
                    mail_args=next(v.decode() for k, v in fields if k == b"X-Mail-Args"),
                    rcpt_args=[v.decode() for k, v in fields if k == b"X-Rcpt-Args"],
                    message=message[:-1],  # smtp-sink ends a dump with an empty line
                )
            )
        return found

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait(10)
        self._proc = None
