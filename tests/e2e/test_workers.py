"""``workers = 2``: two processes share the listening port; the disk queue is sharded."""

from __future__ import annotations

import asyncio
import json
import signal

import aiosmtplib

from tests.e2e.conftest import DaemonFactory
from tests.helpers import until
from tests.integration.smtp.sink import Sink


async def test_two_workers_deliver_each_message_once(
    daemon_factory: DaemonFactory, sink: Sink
) -> None:
    sink.behaviour.rcpt["stuck"] = "451 4.2.1 Mailbox busy"
    daemon = await daemon_factory(
        {
            "workers": 2,
            "routes": {"dest.example": f"[127.0.0.1]:{sink.port}"},
            "retry": {"initial": 3600.0, "maximum": 3600.0},
        }
    )

    await until(lambda: daemon.logs().count("smtpq ready") == 2, timeout=30)

    async def send(n: int) -> None:
        rcpts = ["stuck@dest.example"] if n % 10 == 0 else [f"r{n}@dest.example"]
        message = f"Subject: n{n}\r\nMessage-ID: <n{n}@origin.example>\r\n\r\nbody\r\n".encode()
        errors, _ = await aiosmtplib.send(
            message, sender="alice@origin.example", recipients=rcpts,
            hostname="127.0.0.1", port=daemon.port, start_tls=False,
        )  # fmt: skip
        assert errors == {}

    await asyncio.gather(*(send(n) for n in range(40)))
    await until(lambda: len(sink.received) == 36, timeout=30)
    delivered = sorted(r.recipients[0] for r in sink.received)
    assert delivered == sorted(f"r{n}@dest.example" for n in range(40) if n % 10)
    shards = sorted(p.name for p in daemon.queue_dir.iterdir() if p.name.startswith("shard-"))
    assert shards == ["shard-0", "shard-1"]
    # Both processes took connections, and the operators' view spans both shards.
    accepted_by = {line.split("smtpq[")[1].split("]")[0] for line in daemon.logs().splitlines()
                   if " accepted id=" in line}  # fmt: skip
    assert len(accepted_by) == 2
    code, out, _ = await daemon.cli("queue", "list", "--json")
    assert code == 0
    assert len([json.loads(line) for line in out.splitlines()]) == 4
    del sink.behaviour.rcpt["stuck"]
    code, out, _ = await daemon.cli("queue", "flush", "--all")
    assert code == 0
    await until(lambda: len(sink.received) == 40, timeout=30)
    assert await daemon.stop(signal.SIGTERM) == 0
