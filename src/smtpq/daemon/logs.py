"""The daemon's log: one record per line on standard error, as text or as JSON.

Standard error is what a service manager collects (journald, runit, a container runtime), so
the daemon writes nowhere else; times are UTC. The JSON form is one object per line with
``time``, ``level``, ``logger``, ``pid`` and ``message`` (and ``exception`` when there is a
traceback), for log shippers that parse fields rather than lines.

The queue logs a line or two per message, so a line must cost little: the text form is made
by one f-string with the time stamp formatted once per second (not by the generic
``%``-style machinery), and the lines logged on the event loop during one iteration of it leave
in one write, when the loop next runs its callbacks, instead of a write each. So a process
killed outright (SIGKILL, the OOM killer) may lose the lines of the loop's last iteration —
events of the last few milliseconds, whose effects (a reply sent, a file written) did happen.
Lines logged from other threads, and every line once the loop has stopped, are written at
once; a normal exit writes what is pending (:func:`logging.shutdown`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import TextIO

from smtpq.daemon.config import LogFormat, LogLevel

__all__ = ["JsonFormatter", "LineHandler", "TextFormatter", "configure_logging"]

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class _Stamp:
    """UTC time stamps of whole seconds, the last one kept: records come many to the second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def of(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.text = time.strftime(_TIME_FORMAT, time.gmtime(second))
            self.second = second
        return self.text


class TextFormatter(logging.Formatter):
    """``TIME smtpq[PID] LEVEL LOGGER: MESSAGE``, then the traceback if there is one: what
    ``logging.Formatter("%(asctime)s smtpq[%(process)d] %(levelname)s %(name)s: %(message)s")``
    with UTC times makes, for less."""

    def __init__(self) -> None:
        super().__init__(None, _TIME_FORMAT)
        self.converter = time.gmtime
        self._stamp = _Stamp()

    def format(self, record: logging.LogRecord) -> str:
        """The record's line (and its traceback or stack on the lines after it)."""
        record.message = message = record.getMessage()
        line = (
            f"{self._stamp.of(record.created)} smtpq[{record.process}] {record.levelname} "
            f"{record.name}: {message}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Stamp()

    def format(self, record: logging.LogRecord) -> str:
        """``{"time", "level", "logger", "pid", "message"[, "exception"]}``."""
        data: dict[str, object] = {
            "time": self._stamp.of(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class LineHandler(logging.Handler):
    """Each record as a line on ``stream`` (default: standard error); the lines logged on a
    running event loop are gathered and written together once per iteration of the loop (see
    the module documentation), the others at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        # Lines of the loop's current iteration; only the loop's own thread touches them.
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # where their write is scheduled
        self._thread = 0

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter and emit the record; :meth:`emit` locks only around the stream's write."""
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Format the record; write it now, or with the others of this loop iteration."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: at once
            if self._loop is not None and threading.get_ident() == self._thread:
                self._write_pending()  # its loop stopped before writing them: theirs first
            self._write([line])
            return
        if loop is self._loop:
            self._pending.append(line)
            return
        if self._loop is not None:
            self._write_pending()  # the loop they waited for has stopped
        try:
            loop.call_soon(self._write_pending)
        except RuntimeError:  # the loop is closing
            self._write([line])
            return
        self._pending.append(line)
        self._loop = loop
        self._thread = threading.get_ident()

    def _write_pending(self) -> None:
        self._loop = None
        if self._pending:
            lines, self._pending = self._pending, []
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        self.acquire()
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": lines[0]}))
        finally:
            self.release()

    def flush(self) -> None:
        """Write what the loop's thread has pending (at exit, or when logging is configured
        again)."""
        if self._loop is not None and threading.get_ident() == self._thread:
            self._write_pending()

    def close(self) -> None:
        """Write what is pending; the stream stays open (it is standard error)."""
        self.flush()
        super().close()


def configure_logging(level: LogLevel | str, log_format: LogFormat | str = LogFormat.TEXT) -> None:
    """Send every record at ``level`` or above to standard error in ``log_format``.

    Called again on a reload: the handler is replaced, so the new level and format apply to
    the next record.
    """
    handler = LineHandler()
    json_lines = LogFormat(log_format) == LogFormat.JSON
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        old.flush()
    root.handlers[:] = [handler]
    root.setLevel(LogLevel(level).upper())
    # aiosmtpd logs every connection and command at INFO; our own events say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Neither format shows thread names: the logging HOWTO's advice is not to collect them for
    # every record in a busy process (these two flags are the public way to say so).
    logging.logThreads = False
    logging.logMultiprocessing = False
