"""Handing memory back to the system after large messages.

glibc's malloc raises its mmap threshold to the size of the largest block freed (up to 32 MiB),
so after one 25 MiB message the next large buffers come from the heap, and the heap keeps them
when they are freed: the process stays tens of MiB larger for good. ``malloc_trim`` returns the
free pages. Elsewhere (another libc, another system) there is nothing to do.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

__all__ = ["trim"]


def _load() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _load()


def trim() -> None:
    """Give the free pages of the heap back to the system, where the libc can."""
    if _TRIM is not None:
        _TRIM(0)
