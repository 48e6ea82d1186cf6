"""The daemon's start-up failure: one line for the operator, exit code 2, never a traceback."""

from __future__ import annotations

__all__ = ["StartupError"]


class StartupError(Exception):
    """The daemon, or an offline queue command, cannot start.

    ``str()`` is the whole message for the operator, naming the file, directory or address at
    fault; the ``smtpq`` command prints it as one line on standard error and exits with code 2.
    """
