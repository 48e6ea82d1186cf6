"""Large messages leave no memory behind: the C allocator told to map large blocks apart.

glibc's malloc serves a block of 128 KiB or more with a mapping of its own, given back when the
block is freed; but it raises that threshold to the size of the largest block freed (up to 32
MiB). After one 25 MiB message, the next messages' buffers come from the heap, which keeps them
when they are freed (the process stays tens of MiB larger for good), and several messages
growing at once there copy each other about (a peak of more than twice their size). A fixed
threshold of 1 MiB keeps every message-sized block in its own mapping (grown in place with
``mremap``, and unmapped when freed), and leaves the allocator as it was for everything
smaller: read buffers, Python's own arenas. Measured in bench/edge_memory.py. Elsewhere (another
libc, another system) there is nothing to do.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Final

__all__ = ["map_large_blocks_apart"]

_M_MMAP_THRESHOLD: Final = -3  # glibc's malloc.h
_THRESHOLD: Final = 1 << 20


@functools.cache
def map_large_blocks_apart() -> bool:
    """Fix the process's mmap threshold at 1 MiB (once); whether the libc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
