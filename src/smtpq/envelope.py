"""The envelope: sender, recipients and the message, kept byte for byte.

The message bytes are the source of truth. The header block is kept raw (never re-folded by a
generator, so that a DKIM signature survives the queue); :attr:`Envelope.headers` is a lazy,
read-only parsed view of it. Trace headers are added by prepending raw bytes.

Serialisation (:meth:`Envelope.to_bytes` / :meth:`Envelope.from_bytes`) is a versioned binary
frame, never pickle, so that a shared Redis or a copied queue directory cannot run code::

    magic  b"SMTPQENV"      8 bytes
    version                 1 byte  (1)
    meta length             4 bytes, big endian
    header length           8 bytes, big endian
    body length             8 bytes, big endian
    meta                    UTF-8 JSON object (sender, recipients, client, ...)
    header block, body      raw bytes
    crc32                   4 bytes, big endian, of everything before it
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from smtpq.errors import EnvelopeFormatError

__all__ = ["HEAD_MIN", "Envelope"]

_MAGIC = b"SMTPQENV"
_VERSION = 1
_FRAME = struct.Struct(">8sBIQQ")
#: Bytes of a frame's fixed header: :meth:`Envelope.head_size` needs at least these.
HEAD_MIN = _FRAME.size
_CRC = struct.Struct(">I")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_HEADER_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_FOLD_AT = 78
_COLON = re.compile(rb"[ \t]*:")  # what ends a header field's name
# One encoder for every envelope: json.dumps with options makes a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class Envelope:
    """A message with its SMTP envelope.

    :param sender: the reverse-path; ``''`` is the null sender of bounces.
    :param recipients: the forward-paths.
    :param headers: the header block, as raw bytes (kept as given) or as an
        :class:`email.message.Message` (serialised once, with CRLF line ends).
    :param message: the body bytes, after the blank line that ends the headers.
    """

    __slots__ = (
        "_header_bytes",
        "_parsed",
        "body",
        "body_type",
        "client",
        "dsn_envid",
        "dsn_ret",
        "rcpt_params",
        "receiver",
        "recipients",
        "sender",
        "smtputf8",
        "timestamp",
    )

    def __init__(
        self,
        sender: str | None = None,
        recipients: list[str] | None = None,
        headers: Message | bytes | None = None,
        message: bytes | None = None,
    ) -> None:
        self.sender: str = sender if sender is not None else ""
        self.recipients: list[str] = list(recipients) if recipients else []
        #: Who sent it to us: ip, host, name (the HELO name), protocol, auth.
        self.client: dict[str, str | None] = {}
        #: The name of the host that received the message.
        self.receiver: str | None = None
        #: When the message was received, Unix epoch seconds.
        self.timestamp: float | None = None
        #: RFC 3461 RET (``'FULL'`` or ``'HDRS'``) and ENVID from MAIL FROM.
        self.dsn_ret: str | None = None
        self.dsn_envid: str | None = None
        #: RFC 3461 per-recipient parameters (``NOTIFY``, ``ORCPT``) by recipient address.
        self.rcpt_params: dict[str, dict[str, str]] = {}
        #: The MAIL FROM BODY= value (``'8BITMIME'``, ``'7BIT'``) and SMTPUTF8, to pass on.
        self.body_type: str | None = None
        self.smtputf8: bool = False
        if isinstance(headers, Message):
            headers = headers.as_bytes(policy=compat32.clone(linesep="\r\n"))
            if not headers.endswith(b"\r\n\r\n"):
                headers += b"\r\n"
        self._header_bytes: bytes = headers or b""
        self.body: bytes = message or b""
        self._parsed: Message | None = None

    # -- the message ---------------------------------------------------------------------------

    @property
    def message(self) -> bytes:
        """The body (the name slimta uses for the constructor argument)."""
        return self.body

    @property
    def headers(self) -> Message:
        """A parsed, read-only view of the header block; change headers with the methods here."""
        if self._parsed is None:
            self._parsed = BytesHeaderParser(policy=compat32).parsebytes(self._header_bytes)
        return self._parsed

    def has_header(self, name: str) -> bool:
        """Whether the header block has a field called ``name`` (without parsing it all)."""
        # The name found with find in a lowered copy, then checked to start a line and to be
        # followed by its colon: a regex search tries every offset of the block.
        lowered, key = self._header_bytes.lower(), name.lower().encode("ascii")
        at = lowered.find(key)
        while at >= 0:
            if (at == 0 or lowered[at - 1] == 10) and _COLON.match(lowered, at + len(key)):
                return True
            at = lowered.find(key, at + 1)
        return False

    def parse(self, data: bytes | bytearray | memoryview) -> None:
        """Split a whole message into its header block (with the blank line) and its body.

        Each part is copied out of ``data`` once (a bytearray or memoryview is not copied whole
        first): a received message is in memory at most twice, here.
        """
        if data[:1] == b"\n" or data[:2] == b"\r\n":
            split = 1 if data[:1] == b"\n" else 2  # an empty header block
        elif not _HEADER_FIELD.match(data):
            split = 0  # does not start with a header field: it is all body
        else:
            match = _BLANK_LINE.search(data)
            split = match.end() if match is not None else len(data)
        with memoryview(data) as view:
            self._header_bytes = bytes(view[:split])
            self.body = bytes(view[split:])
        self._parsed = None

    def flatten(self) -> tuple[bytes, bytes]:
        """The header block (ending with its blank line) and the body; together, the message."""
        return self._header_bytes, self.body

    def __len__(self) -> int:
        return len(self._header_bytes) + len(self.body)

    def _linesep(self) -> bytes:
        sample = self._header_bytes or self.body[:1000]
        return b"\n" if b"\n" in sample and b"\r\n" not in sample else b"\r\n"

    def _field(self, name: str, value: str) -> bytes:
        sep = self._linesep()
        line = f"{name}: {value}"
        if len(line) <= _FOLD_AT:
            return line.encode("utf-8") + sep
        lines: list[str] = []
        line = f"{name}:"
        bare = True  # no word on the line yet: a word too long for it stays on it anyway
        for word in value.split(" "):
            if word and len(line) + 1 + len(word) > _FOLD_AT and not bare:
                lines.append(line)
                line = "\t" + word
            else:
                line = f"{line} {word}"
            bare = bare and not word
        lines.append(line)
        return ("\n" if sep == b"\n" else "\r\n").join(lines).encode("utf-8") + sep

    def prepend_header(self, name: str, value: str) -> None:
        """Add a header field at the top (trace fields: Received, Return-Path)."""
        self._header_bytes = self._field(name, value) + self._header_bytes
        self._parsed = None

    def append_header(self, name: str, value: str) -> None:
        """Add a header field at the end of the header block (Date, Message-ID when missing)."""
        block, field = self._header_bytes, self._field(name, value)
        if block.endswith(b"\r\n\r\n") or block == b"\r\n":
            block = block[:-2] + field + b"\r\n"
        elif block.endswith(b"\n\n") or block == b"\n":
            block = block[:-1] + field + b"\n"
        elif block:  # a headers-only message: no blank line to keep before
            block = (block if block.endswith(b"\n") else block + self._linesep()) + field
        else:  # no header block at all: the field starts one, ended by a blank line
            block = field + self._linesep()
        self._header_bytes = block
        self._parsed = None

    # -- copies --------------------------------------------------------------------------------

    def copy(self, new_rcpts: list[str] | None = None) -> Envelope:
        """An independent copy, optionally for other recipients (message bytes are shared)."""
        new = Envelope.__new__(Envelope)
        new.sender = self.sender
        new.recipients = list(self.recipients if new_rcpts is None else new_rcpts)
        new.client = dict(self.client)
        new.receiver = self.receiver
        new.timestamp = self.timestamp
        new.dsn_ret = self.dsn_ret
        new.dsn_envid = self.dsn_envid
        new.rcpt_params = {k: dict(v) for k, v in self.rcpt_params.items()}
        new.body_type = self.body_type
        new.smtputf8 = self.smtputf8
        new._header_bytes = self._header_bytes
        new.body = self.body
        new._parsed = None
        return new

    # -- serialisation -------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "recipients": self.recipients,
            "client": self.client,
            "receiver": self.receiver,
            "timestamp": self.timestamp,
            "dsn_ret": self.dsn_ret,
            "dsn_envid": self.dsn_envid,
            "rcpt_params": self.rcpt_params,
            "body_type": self.body_type,
            "smtputf8": self.smtputf8,
        }

    def to_bytes(self) -> bytes:
        """Serialise to the versioned frame described in the module docstring."""
        meta = _ENCODER.encode(self._meta()).encode()
        head = _FRAME.pack(_MAGIC, _VERSION, len(meta), len(self._header_bytes), len(self.body))
        crc = zlib.crc32(head)
        for part in (meta, self._header_bytes, self.body):
            crc = zlib.crc32(part, crc)
        return b"".join((head, meta, self._header_bytes, self.body, _CRC.pack(crc)))

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Rebuild an envelope; :class:`EnvelopeFormatError` if damaged or of another version."""
        view = memoryview(data)
        if len(view) < _FRAME.size + _CRC.size:
            raise EnvelopeFormatError("envelope data truncated")
        magic, version, meta_len, head_len, body_len = _FRAME.unpack_from(view)
        if magic != _MAGIC:
            raise EnvelopeFormatError("not an smtpq envelope (bad magic)")
        if version != _VERSION:
            raise EnvelopeFormatError(f"unsupported envelope format version {version}")
        end = _FRAME.size + meta_len + head_len + body_len
        if len(view) != end + _CRC.size:
            raise EnvelopeFormatError("envelope data truncated or has trailing bytes")
        (crc,) = _CRC.unpack_from(view, end)
        if zlib.crc32(view[:end]) != crc:
            raise EnvelopeFormatError("envelope checksum mismatch")
        pos = _FRAME.size
        env = cls._from_meta(view[pos : pos + meta_len])
        pos += meta_len
        env._header_bytes = bytes(view[pos : pos + head_len])
        env.body = bytes(view[pos + head_len : end])
        return env

    @classmethod
    def _from_meta(cls, data: memoryview | bytes) -> Envelope:
        try:
            meta = json.loads(bytes(data))
            env = cls(meta["sender"], meta["recipients"])
            env.client = dict(meta["client"])
            env.receiver = meta["receiver"]
            env.timestamp = meta["timestamp"]
            env.dsn_ret = meta["dsn_ret"]
            env.dsn_envid = meta["dsn_envid"]
            env.rcpt_params = {k: dict(v) for k, v in meta["rcpt_params"].items()}
            env.body_type = meta["body_type"]
            env.smtputf8 = bool(meta["smtputf8"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EnvelopeFormatError(f"envelope metadata unreadable: {exc}") from exc
        return env

    @staticmethod
    def head_size(data: bytes) -> int:
        """How many bytes from the start of a frame :meth:`from_head` needs (the frame header
        and the metadata), given at least the frame header (:data:`HEAD_MIN` bytes)."""
        if len(data) < _FRAME.size:
            raise EnvelopeFormatError("envelope data truncated")
        return _FRAME.size + int(_FRAME.unpack_from(data)[2])

    @classmethod
    def from_head(cls, data: bytes) -> tuple[Envelope, int]:
        """The envelope without its message, from the start of a frame, and the message's size.

        For listings: the addresses and metadata, without reading the message. The returned
        envelope has an empty header block and body. The checksum covers the whole frame, so
        it is not verified here; :meth:`from_bytes` verifies it when the message is read.
        """
        if len(data) < _FRAME.size:
            raise EnvelopeFormatError("envelope data truncated")
        magic, version, meta_len, head_len, body_len = _FRAME.unpack_from(data)
        if magic != _MAGIC:
            raise EnvelopeFormatError("not an smtpq envelope (bad magic)")
        if version != _VERSION:
            raise EnvelopeFormatError(f"unsupported envelope format version {version}")
        if len(data) < _FRAME.size + meta_len:
            raise EnvelopeFormatError("envelope data truncated")
        env = cls._from_meta(memoryview(data)[_FRAME.size : _FRAME.size + meta_len])
        return env, head_len + body_len

    def __repr__(self) -> str:
        return f"<Envelope from {self.sender!r} to {self.recipients!r}, {len(self)} bytes>"
