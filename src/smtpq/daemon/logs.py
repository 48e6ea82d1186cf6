"""The daemon's log: one record per line on standard error, as text or as JSON.

Standard error is what a service manager collects (journald, runit, a container runtime), so
the daemon writes nowhere else; times are UTC. The JSON form is one object per line with
``time``, ``level``, ``logger``, ``pid`` and ``message`` (and ``exception`` when there is a
traceback), for log shippers that parse fields rather than lines.
"""

from __future__ import annotations

import json
import logging
import time

from smtpq.daemon.config import LogFormat, LogLevel

__all__ = ["JsonFormatter", "configure_logging"]

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """``{"time", "level", "logger", "pid", "message"[, "exception"]}``."""
        data: dict[str, object] = {
            "time": time.strftime(_TIME_FORMAT, time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(level: LogLevel | str, log_format: LogFormat | str = LogFormat.TEXT) -> None:
    """Send every record at ``level`` or above to standard error in ``log_format``.

    Called again on a reload: the handler is replaced, so the new level and format apply to
    the next record.
    """
    handler = logging.StreamHandler()
    formatter: logging.Formatter
    if LogFormat(log_format) == LogFormat.JSON:
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s smtpq[%(process)d] %(levelname)s %(name)s: %(message)s", _TIME_FORMAT
        )
        formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LogLevel(level).upper())
    # aiosmtpd logs every connection and command at INFO; our own events say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # Neither format shows thread names: the logging HOWTO's advice is not to collect them for
    # every record in a busy process (these two flags are the public way to say so).
    logging.logThreads = False
    logging.logMultiprocessing = False
