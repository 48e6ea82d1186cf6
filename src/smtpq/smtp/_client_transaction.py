"""The client's mail transaction: what is sent when, and what each reply means for whom.

With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one write; with CHUNKING (RFC 3030)
``BDAT n LAST`` and the whole content replace DATA, so that a pipelined transaction is a single
write and a single round trip. Without PIPELINING each command waits for the previous reply.
Either way every reply is read and kept (RFC 2920 §3.1):

* a refused MAIL refuses every recipient; the replies that follow it (503s) are read and
  ignored, and no transaction is open;
* a refused RCPT is that recipient's outcome;
* when no RCPT was accepted, the reply to DATA (a 503 or 554, normally) is no outcome of
  anybody's; a 354 there is answered with a lone dot, and the transaction is over; else it is
  left open, to be reset (RSET) before the next;
* the reply to the content (after DATA's 354, or to BDAT) is the outcome of every accepted
  recipient; after the content the transaction is over whatever the reply (RFC 5321 §4.1.1.4),
  except that a refused BDAT leaves it undetermined (RFC 3030 §4.2): reset;
* a ``421`` anywhere ends it: the server is closing, and every recipient it had not refused
  carries that ``421``.

Before anything is sent, the transaction may be refused here, for every recipient: a sender
that cannot go on a command line (``553 5.1.7``), SMTPUTF8 needed but not offered (``554
5.6.7``: RFC 6531 §3.4 forbids sending it downgraded), a BINARYMIME body without CHUNKING and
BINARYMIME (``554 5.6.3``), a message over the server's declared SIZE (``552 5.3.4``). A
recipient that cannot go on a command line is refused alone (``553 5.1.3``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from smtpq.reply import Reply
from smtpq.smtp._client_events import Extensions, Transaction
from smtpq.smtp._client_writers import canonical_parts, encoded_params, sendable, stuffed_parts
from smtpq.smtp._replies import BadReply

__all__ = ["MakeReply", "TransactionRun"]

#: Builds a Reply from the server: (code, text, command, address).
MakeReply = Callable[[str, str, str, str | None], Reply]

# What an awaited reply answers, and the command its Reply names.
_MAIL, _RCPT, _DATA, _DOT, _BDAT = "MAIL", "RCPT", "DATA", "DOT", "BDAT"
_COMMAND = {_MAIL: "MAIL FROM", _RCPT: "RCPT TO", _DATA: "DATA", _DOT: "DATA", _BDAT: "BDAT"}


class TransactionRun:
    """One transaction in flight: :meth:`start` gives the first bytes to send, then each reply
    goes to :meth:`on_reply`, which gives the next bytes (none: empty) until :attr:`done`.

    :param transaction: what to send.
    :param extensions: what the server advertised.
    :param make: builds a Reply from the server.
    :param chunking: use BDAT where the server offers CHUNKING.
    """

    __slots__ = (
        "_accepted",
        "_binary",
        "_chunk",
        "_content",
        "_expected",
        "_extensions",
        "_final",
        "_mail_ok",
        "_make",
        "_pipelined",
        "_rcpt_lines",
        "closing",
        "done",
        "open",
        "replies",
        "transaction",
    )

    def __init__(
        self, transaction: Transaction, extensions: Extensions, make: MakeReply, chunking: bool
    ) -> None:
        self.transaction = transaction
        self._extensions = extensions
        self._make = make
        self._pipelined = extensions.pipelining
        self._binary = (transaction.body or "").upper() == "BINARYMIME"
        self._chunk = chunking and extensions.chunking
        self._expected: deque[tuple[str, str | None]] = deque()
        self._accepted: list[str] = []
        self._rcpt_lines: deque[tuple[str, bytes]] = deque()
        self._final: list[bytes] = []
        self._content: list[bytes] = []
        self._mail_ok = False
        #: Per recipient, the outcome so far: refusals (which stand if the session fails
        #: later), then the content's reply for the accepted.
        self.replies: dict[str, Reply] = {}
        #: The server said 421.
        self.closing = False
        #: Every reply read, nothing more to send.
        self.done = False
        #: A transaction is open on the server (MAIL accepted, not ended): RSET before the next.
        self.open = False

    @property
    def awaiting(self) -> str | None:
        """The command whose reply is awaited next."""
        return _COMMAND[self._expected[0][0]] if self._expected else None

    def result(self) -> dict[str, Reply]:
        """Every recipient's outcome, in the order given."""
        return {rcpt: self.replies[rcpt] for rcpt in self.transaction.recipients}

    # -- sending -------------------------------------------------------------------------------

    def start(self) -> list[bytes]:
        """The first write: the whole group when pipelining, else MAIL; none if refused here."""
        tx, extensions = self.transaction, self._extensions
        parts = (tx.content,) if isinstance(tx.content, bytes) else tx.content
        if not self._binary:
            parts = canonical_parts(parts)
        size = sum(map(len, parts))
        refusal = self._refusal(size)
        if refusal is not None:
            self.replies = {rcpt: refusal.replace(address=rcpt) for rcpt in tx.recipients}
            self.done = True
            return []
        encoding = "utf-8" if extensions.smtputf8 else "ascii"
        for rcpt in tx.recipients:
            if not sendable(rcpt):
                text = "5.1.3 Bad destination mailbox address syntax"
                self.replies[rcpt] = Reply("553", text, "RCPT TO", rcpt)
                continue
            line = b"RCPT TO:<" + rcpt.encode() + b">"
            params = tx.rcpt_params.get(rcpt) if extensions.dsn else None
            if params:
                line = b" ".join([line, *encoded_params(params, encoding)])
            self._rcpt_lines.append((rcpt, line + b"\r\n"))
        if not self._rcpt_lines:
            self.done = True
            return []
        if self._chunk:
            self._final = [b"BDAT %d LAST\r\n" % size, *parts]
        else:
            self._final = [b"DATA\r\n"]
            self._content = stuffed_parts(parts)
        mail = self._mail_line(size, all(part.isascii() for part in parts))
        self._expected.append((_MAIL, None))
        if not self._pipelined:
            return [mail]
        group = [mail]
        for rcpt, line in self._rcpt_lines:
            group.append(line)
            self._expected.append((_RCPT, rcpt))
        self._rcpt_lines.clear()
        group.extend(self._final)
        self._expected.append((_BDAT if self._chunk else _DATA, None))
        return group

    def _mail_line(self, size: int, ascii: bool) -> bytes:
        tx, extensions = self.transaction, self._extensions
        params: list[bytes] = []
        if tx.smtputf8:
            params.append(b"SMTPUTF8")
        if self._binary:
            params.append(b"BODY=BINARYMIME")
        elif extensions.eightbitmime and ((tx.body or "").upper() == "8BITMIME" or not ascii):
            params.append(b"BODY=8BITMIME")
        if extensions.size is not None:
            params.append(b"SIZE=%d" % size)
        if extensions.dsn:
            dsn = {key: value for key, value in (("RET", tx.ret), ("ENVID", tx.envid)) if value}
            params.extend(encoded_params(dsn, "ascii"))
        line = b"MAIL FROM:<" + tx.sender.encode() + b">"
        return b" ".join([line, *params]) + b"\r\n" if params else line + b"\r\n"

    def _refusal(self, size: int) -> Reply | None:
        """Our verdict for every recipient when the transaction cannot be sent at all."""
        tx, extensions = self.transaction, self._extensions
        if not sendable(tx.sender):
            return Reply("553", "5.1.7 Bad sender address syntax", "MAIL FROM")
        if tx.smtputf8 and not extensions.smtputf8:
            text = "5.6.7 SMTPUTF8 is required, but was not offered by host"
            return self._make("554", text, "MAIL FROM", None)
        if self._binary and not (self._chunk and extensions.binarymime):
            text = "5.6.3 BINARYMIME needs CHUNKING and BINARYMIME, not offered by host"
            return self._make("554", text, "MAIL FROM", None)
        if extensions.size and size > extensions.size:
            text = f"5.3.4 Message size exceeds fixed maximum message size of host ({size})"
            return self._make("552", text, "MAIL FROM", None)
        return None

    # -- replies -------------------------------------------------------------------------------

    def on_reply(self, code: str, text: str) -> list[bytes]:
        """Take the next reply; the bytes to send next (none: empty). Raises :class:`BadReply`
        for a reply the command cannot have."""
        step, rcpt = self._expected[0]
        command = _COMMAND[step]
        if (code[0] in "23" and code != "354") if step == _DATA else code[0] == "3":
            # A positive reply that the command cannot have: taking a 250 to DATA as the
            # content's would report a message delivered that was never sent.
            raise BadReply(f"unexpected reply {code} to {command}")
        self._expected.popleft()
        if code == "421":
            self._closing(code, text, command)
            return []
        out: list[bytes] = []
        success = code[0] == "2"
        if step == _MAIL:
            if success:
                self._mail_ok = self.open = True
            else:
                for other, _ in self._rcpt_lines:
                    self.replies[other] = self._make(code, text, command, other)
                for queued, address in self._expected:
                    if queued == _RCPT and address is not None:
                        self.replies[address] = self._make(code, text, command, address)
            if self._mail_ok and not self._pipelined:
                out = self._next_rcpt()
        elif step == _RCPT:
            if self._mail_ok and rcpt is not None:
                if success:  # its outcome will be the content's reply
                    self._accepted.append(rcpt)
                else:
                    self.replies[rcpt] = self._make(code, text, command, rcpt)
            if self._mail_ok and not self._pipelined:
                out = self._next_rcpt()
        elif step == _DATA and code == "354":
            self._expected.append((_DOT, None))
            # With nobody accepted (RFC 2920 §3.1), a lone dot ends the transaction.
            out = self._content if self._accepted else [b".\r\n"]
        else:  # DATA refused, or the reply to the content (after 354, or to BDAT)
            for other in self._accepted:
                self.replies[other] = self._make(code, text, command, other)
            if step == _DOT or (step == _BDAT and success and self._accepted):
                self.open = False
        self.done = not self._expected
        return out

    def _next_rcpt(self) -> list[bytes]:
        """Without pipelining: the next RCPT, or DATA/BDAT once they are all answered."""
        if self._rcpt_lines:
            rcpt, line = self._rcpt_lines.popleft()
            self._expected.append((_RCPT, rcpt))
            return [line]
        if not self._accepted:
            return []  # nobody accepted: no DATA; the transaction stays open (RSET)
        self._expected.append((_BDAT if self._chunk else _DATA, None))
        return self._final

    def _closing(self, code: str, text: str, command: str) -> None:
        """A 421: every recipient not refused carries it; nothing more comes."""
        for rcpt in self.transaction.recipients:
            if rcpt not in self.replies:
                self.replies[rcpt] = self._make(code, text, command, rcpt)
        self._expected.clear()
        self.closing = self.done = True
        self.open = False
