"""Postfix's DSNs and smtpq's for the same failures, side by side (docs/dsn.md).

Not a benchmark and not a test (it needs root and Postfix): the source of the comparison in
docs/dsn.md. Run as root on a machine with Postfix installed (Debian's ``postfix`` package)::

    .venv/bin/python bench/dsn_compare.py            # writes bench/work/dsn-*.eml, prints a table

One next hop on 127.0.0.1 (an aiosmtpd server) answers each RCPT as told and accepts the DSNs
to the sender. Two scenarios, the same message (ENVID, an ORCPT, NOTIFY) to each MTA:

* ``failed``: four recipients refused with four different 5xx texts;
* ``delayed`` and ``expired``: one recipient answered ``452 4.2.2`` on every attempt, until a
  delay warning and then the end of the message's lifetime.

Postfix is a private instance in a temporary directory (its own main.cf and master.cf, queue
and data directories, smtpd on a free loopback port, the next hop as relayhost), started with
``postfix -c DIR start`` and stopped with ``postfix -c DIR stop``; the system's Postfix
configuration is not touched. It runs with times in seconds (delay_warning_time = 3s,
maximal_queue_lifetime = 25s); smtpq runs in this process on a manual clock with its daemon
defaults (delay_warnings = [14400], lifetime 5 days): the same events, at other times.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from email.message import Message
from email.policy import compat32
from pathlib import Path
from typing import cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpq import DictStorage, ManualClock, Queue, StaticSmtpRelay
from smtpq.dsn import xtext_encode
from smtpq.edge import EdgeConfig, SmtpEdge

SENDER = "alice@origin.example"
REFUSED = {
    "a": "550 5.1.1 <a@dest.example>: Recipient address rejected: User unknown",
    "b": "552 5.2.2 <b@dest.example>: Mailbox full",
    "c": "554 5.7.1 <c@dest.example>: Relay access denied",
    "d": "553 5.1.3 <d@dest.example>: Bad recipient address syntax",
}
FULL = {"late": "452 4.2.2 <late@dest.example>: Mailbox full, try again later"}
MESSAGE = (
    b"From: Alice <alice@origin.example>\r\n"
    b"To: several <undisclosed-recipients:;>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <dsn-compare@origin.example>\r\n"
    b"\r\n"
    b"The figures.\r\n"
)
ENVID = "batch+7=1"
ORCPT = "Orig+a@dest.example"
WORK = Path(__file__).resolve().parent / "work"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NextHop:
    """The next hop of both MTAs: refuses per recipient as told, keeps the DSNs it accepts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.replies: dict[str, str] = {}
        self.dsns: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.replies.get(address.split("@")[0])
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if envelope.mail_from in ("", "<>"):
            self.dsns.append(envelope.original_content or b"")
        return "250 2.0.0 Ok: queued as NEXTHOP"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="nexthop.dest.example"), "127.0.0.1", self.port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_dsns(self, count: int, timeout: float) -> list[bytes]:
        """The first ``count`` DSNs, waiting for them in real time."""
        async with asyncio.timeout(timeout):
            while len(self.dsns) < count:  # noqa: ASYNC110 - polls a list the server fills
                await asyncio.sleep(0.1)
        return self.dsns[:count]


def submit(port: int, rcpts: list[str]) -> None:
    """The message with RET=FULL, an ENVID, and an ORCPT for the first recipient."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.origin.example")
        client.mail(SENDER, [f"ENVID={xtext_encode(ENVID)}", "RET=FULL"])
        for n, rcpt in enumerate(rcpts):
            options = [f"ORCPT=rfc822;{xtext_encode(ORCPT)}"] if n == 0 else []
            client.rcpt(rcpt, options)
        client.data(MESSAGE)


# -- Postfix -------------------------------------------------------------------------------------

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """A Postfix instance of its own in ``root``: config, queue, data and log."""

    def __init__(self, root: Path, port: int, next_hop: int) -> None:
        self.root, self.port = root, port
        self.etc = root / "etc"
        for sub in ("etc", "spool", "data"):
            (root / sub).mkdir(parents=True)
        root.chmod(0o755)  # its daemons run as the postfix user
        shutil.chown(root / "data", "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": root / "spool",
            "data_directory": root / "data",
            "maillog_file_prefixes": root,
            "maillog_file": root / "postfix.log",
            "myhostname": "mta.test.example",
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks reject",
            "relayhost": f"[127.0.0.1]:{next_hop}",
            "alias_maps": "",
            "alias_database": "",
            "smtputf8_enable": "yes",
            # Seconds instead of hours and days: the same events, soon.
            "delay_warning_time": "3s",
            "maximal_queue_lifetime": "25s",
            "bounce_queue_lifetime": "25s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "queue_run_delay": "2s",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=port))

    def postfix(self, command: str) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), command], check=True, capture_output=True)

    def start(self) -> None:
        self.postfix("check")
        self.postfix("start")
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """``postfix -c DIR stop``: its own master, by the pid in its own queue directory."""
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], check=False, capture_output=True)


async def scenarios(
    hop: NextHop, port: int, late: Callable[[], Awaitable[list[bytes]]]
) -> dict[str, bytes]:
    """Both scenarios against the MTA on ``port``; ``late`` brings the delayed and expired DSNs
    (by waiting, or by moving a clock)."""
    hop.dsns.clear()
    hop.replies = dict(REFUSED)
    await asyncio.to_thread(submit, port, [f"{x}@dest.example" for x in REFUSED])
    [failed] = await hop.wait_dsns(1, 60)
    hop.dsns.clear()
    hop.replies = dict(FULL)
    await asyncio.to_thread(submit, port, ["late@dest.example"])
    delayed, expired = await late()
    return {"failed": failed, "delayed": delayed, "expired": expired}


async def postfix_dsns(hop: NextHop) -> dict[str, bytes]:
    root = Path(tempfile.mkdtemp(prefix="smtpq-dsn-postfix-"))
    postfix = PrivatePostfix(root, free_port(), hop.port)
    try:
        await asyncio.to_thread(postfix.start)
        return await scenarios(hop, postfix.port, lambda: hop.wait_dsns(2, 120))
    finally:
        await asyncio.to_thread(postfix.stop)
        shutil.rmtree(root, ignore_errors=True)


# -- smtpq ---------------------------------------------------------------------------------------


async def smtpq_dsns(hop: NextHop) -> dict[str, bytes]:
    clock = ManualClock(time.time())
    relay = StaticSmtpRelay("127.0.0.1", hop.port)
    queue = Queue(
        DictStorage(), relay, clock=clock, hostname="mta.test.example", delay_warnings=[14400]
    )
    config = EdgeConfig(port=0, hostname="mta.test.example", reverse_lookup=False)
    edge = SmtpEdge(queue, config, clock=clock)

    async def days_pass() -> list[bytes]:
        while len(hop.dsns) < 2:  # ten minutes at a time
            await clock.advance(600)
            await asyncio.sleep(0.02)
        return hop.dsns[:2]

    async with queue, edge:
        dsns = await scenarios(hop, edge.port, days_pass)
    await relay.close()
    return dsns


# -- the table -----------------------------------------------------------------------------------


def report(data: bytes) -> tuple[Message, list[Message]]:
    """The DSN and its delivery-status blocks (per message, then per recipient)."""
    msg = email.message_from_bytes(data, policy=compat32)
    parts = cast(list[Message], msg.get_payload())
    return msg, cast(list[Message], parts[1].get_payload())


def table(ours: bytes, theirs: bytes) -> str:
    """A Markdown table of the fields of both DSNs (the first recipient block of each)."""
    rows: list[tuple[str, str, str]] = []
    for where, pick in (("header", 0), ("per message", 1), ("per recipient", 2)):
        mine_msg, mine_blocks = report(ours)
        pf_msg, pf_blocks = report(theirs)
        if pick == 0:
            a: Message = pf_msg
            b: Message = mine_msg
            names = ["From", "Subject", "Auto-Submitted", "Content-Type"]
        else:
            a, b = pf_blocks[pick - 1], mine_blocks[pick - 1]
            names = list(dict.fromkeys([*a.keys(), *b.keys()]))
        for name in names:
            pf, mine = a.get(name), b.get(name)
            clean = [" ".join(str(v).split()) if v is not None else "(none)" for v in (pf, mine)]
            rows.append((f"{where}: {name}", clean[0], clean[1]))
    lines = ["| field | Postfix | smtpq |", "|---|---|---|"]
    lines += [f"| {f} | `{p}` | `{s}` |" for f, p, s in rows]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=WORK, help="where the .eml files go")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("dsn_compare: Postfix's master needs root")
    hop = NextHop(free_port())
    await hop.start()
    try:
        theirs = await postfix_dsns(hop)
        ours = await smtpq_dsns(hop)
    finally:
        await hop.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in ("failed", "delayed", "expired"):
        (args.out / f"dsn-postfix-{kind}.eml").write_bytes(theirs[kind])
        (args.out / f"dsn-smtpq-{kind}.eml").write_bytes(ours[kind])
        print(f"\n## {kind}\n\n{table(ours[kind], theirs[kind])}")
    print(f"\nwritten: {args.out}/dsn-{{postfix,smtpq}}-{{failed,delayed,expired}}.eml")


if __name__ == "__main__":
    asyncio.run(main())
