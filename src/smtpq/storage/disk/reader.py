"""Reading stored messages of a disk queue: whole entries, listing records, ids (worker
threads only).

A listing reads each meta file and only the start of each envelope file (its metadata, not the
message), the files of :data:`INFO_AHEAD` messages asked for ahead of the one being read, as the
load scan does: a listing of messages that are not in the page cache waits for many reads at
once, not for one after another.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from smtpq.envelope import HEAD_MIN, Envelope
from smtpq.errors import EnvelopeFormatError, MessageGone
from smtpq.reply import Reply
from smtpq.storage.base import MessageInfo, StoredMessage
from smtpq.storage.disk.meta import CorruptError, Meta, decode_meta
from smtpq.storage.disk.spool import ENV_SUFFIX, META_NAME, META_SUFFIX, Spool, read_all

__all__ = ["INFO_AHEAD", "meta_keys", "read_ahead", "read_entry", "read_infos", "record_of"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Messages whose files a listing opens (their reads asked for) ahead of the one being read.
INFO_AHEAD = 32
# Enough for the frame header and the metadata of nearly every envelope in one read.
_HEAD_READ = 4096


def read_entry(spool: Spool, id: str) -> StoredMessage:
    """Everything stored about message ``id``: MessageGone when it is not stored,
    CorruptError when one of its files is damaged."""
    spool.open()
    meta = spool.read_meta(id)
    try:
        data = spool.read(id + ENV_SUFFIX, "env")
    except FileNotFoundError:
        raise MessageGone(id) from None
    try:
        envelope = Envelope.from_bytes(data)
    except EnvelopeFormatError as exc:
        raise CorruptError(str(exc)) from exc
    return record_of(StoredMessage.from_written, id, envelope, meta)


def meta_keys(spool: Spool) -> list[int]:
    """The keys of the meta files, sorted: the stored messages, without reading them."""
    spool.open()
    with os.scandir(spool.meta_dir) as it:
        keys = [int(e.name[:32], 16) for e in it if META_NAME.fullmatch(e.name)]
    keys.sort()
    return keys


def read_infos(spool: Spool, ids: list[str]) -> list[MessageInfo]:
    """The listing records of ``ids`` (valid ids), in order; those gone or damaged are left
    out (an attempt to read a damaged one quarantines it)."""
    spool.open()
    infos: list[MessageInfo] = []
    ahead: deque[tuple[str, int | OSError, int | OSError]] = deque()
    try:
        for id in ids:
            meta = spool.open_ahead(id + META_SUFFIX, "meta", 0)
            ahead.append((id, meta, spool.open_ahead(id + ENV_SUFFIX, "env", _HEAD_READ)))
            if len(ahead) > INFO_AHEAD:
                _read_info_into(infos, *ahead.popleft())
        while ahead:
            _read_info_into(infos, *ahead.popleft())
    finally:
        for _, *fds in ahead:
            for fd in fds:
                if isinstance(fd, int):
                    os.close(fd)
    return infos


def _read_info_into(
    infos: list[MessageInfo], id: str, meta: int | OSError, env: int | OSError
) -> None:
    """Append the record of message ``id`` from its opened files (which it closes), unless
    it is gone or damaged."""
    try:
        infos.append(_read_info(id, meta, env))
    except (MessageGone, CorruptError, EnvelopeFormatError):
        pass
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR):
            raise


def _opened(id: str, fd: int | OSError) -> int:
    """The fd of a file opened ahead; or what opening it raised (MessageGone if it was gone)."""
    if isinstance(fd, FileNotFoundError):
        raise MessageGone(id)
    if isinstance(fd, OSError):
        raise fd
    return fd


def _read_info(id: str, meta_fd: int | OSError, env_fd: int | OSError) -> MessageInfo:
    try:
        meta_in, env_in = _opened(id, meta_fd), _opened(id, env_fd)
        meta = decode_meta(read_all(meta_in))
        data = os.read(env_in, _HEAD_READ)
        if len(data) >= HEAD_MIN:
            need = Envelope.head_size(data)
            while len(data) < need and (chunk := os.read(env_in, need - len(data))):
                data += chunk
    finally:
        for fd in (meta_fd, env_fd):
            if isinstance(fd, int):
                os.close(fd)
    return record_of(MessageInfo.from_head, id, data, meta)


def record_of(make: Callable[..., T], id: str, stored: Envelope | bytes, meta: Meta) -> T:
    """A record of message ``id`` by ``make`` (:meth:`StoredMessage.from_written`,
    :meth:`MessageInfo.from_head`), from its envelope or envelope head, and its meta."""
    return make(
        id,
        stored,
        meta.delivered,
        attempts=meta.attempts,
        timestamp=meta.timestamp,
        held=meta.held,
        last_reply=Reply.from_dict(meta.last_reply) if meta.last_reply else None,
    )


def read_ahead(spool: Spool, ids: list[str]) -> None:
    """Ask for the files of messages ``ids`` to be read into the page cache: messages that fall
    due after days in a big queue are not in it, and their attempts, each reading its message
    in turn, would otherwise wait for one disk read after another. Only a hint: failures are
    logged at debug level, the attempts read the files and report what fails."""
    try:
        spool.open()
        for id in ids:
            for fd in (
                spool.open_ahead(id + META_SUFFIX, "meta", 0),
                spool.open_ahead(id + ENV_SUFFIX, "env", 0),
            ):
                if isinstance(fd, int):
                    os.close(fd)
    except Exception:
        log.debug("reading ahead failed", exc_info=True)
