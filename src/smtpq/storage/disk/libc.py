"""The two C library calls a disk queue needs that :mod:`os` does not offer.

Both are called through :mod:`ctypes`, which releases the GIL for the call's duration, so that
other threads run while one waits for the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["exchange_function", "syncfs_function"]

_RENAME_EXCHANGE = 2


def _libc_function(name: str) -> Any:
    """A function of the C library, or None where there is none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def syncfs_function() -> Callable[[int], None] | None:
    """``syncfs(fd)`` (flush the whole filesystem holding ``fd``) where it reports write-back
    errors, Linux 5.8 and later; None elsewhere. It raises :class:`OSError` on failure."""
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    if sys.platform != "linux" or not release or (int(release[1]), int(release[2])) < (5, 8):
        return None
    func = _libc_function("syncfs")
    if func is None:
        return None

    def syncfs(fd: int) -> None:
        if func(fd) != 0:
            _raise_errno()

    return syncfs


def exchange_function() -> Callable[[int, str, int, str], None] | None:
    """``exchange(src_dir_fd, src, dst_dir_fd, dst)``: swap two names atomically
    (``renameat2(RENAME_EXCHANGE)``), or None where the C library has no renameat2.

    It raises :class:`OSError`; ``EINVAL``, ``ENOSYS`` or ``EOPNOTSUPP`` when the kernel or the
    filesystem cannot exchange.
    """
    func = _libc_function("renameat2")
    if func is None:
        return None

    def exchange(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
        if func(src_dir_fd, src.encode(), dst_dir_fd, dst.encode(), _RENAME_EXCHANGE) != 0:
            _raise_errno()

    return exchange
