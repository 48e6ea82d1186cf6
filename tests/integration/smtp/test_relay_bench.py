"""bench/relay_bench.py and its old-relay peer stay runnable: a few messages through each peer
into an aiosmtpd sink (what they measure is the benchmark's business, not a test's)."""

from __future__ import annotations

import pytest
import relay_bench
from aiosmtplib_relay import AiosmtplibRelay

from smtpq import Envelope, Reply
from smtpq.relay import SmtpRelayConfig
from tests.integration.smtp.conftest import SinkFactory


async def test_the_old_relay_still_delivers(sink_factory: SinkFactory) -> None:
    sink = await sink_factory()
    sink.behaviour.rcpt = {"nobody": "550 5.1.1 No such user"}
    relay = AiosmtplibRelay("127.0.0.1", sink.port, config=SmtpRelayConfig(helo_name="b.test"))
    env = Envelope("a@example.org", ["a@x.example", "nobody@x.example"])
    env.parse(b"Subject: old\r\n\r\n.dot\r\n")
    try:
        result = await relay.attempt(env, 0)
    finally:
        await relay.close()
    assert {r: v.code for r, v in result.items() if isinstance(v, Reply)} == {
        "a@x.example": "250",
        "nobody@x.example": "550",
    }
    assert sink.received[0].data == b"Subject: old\r\n\r\n.dot\r\n"


@pytest.mark.parametrize("peer", relay_bench.PEERS)
async def test_measure(sink_factory: SinkFactory, peer: str) -> None:
    sink = await sink_factory(pipelining=True)
    result = await relay_bench.measure(peer, sink.port, n=6, size=2048, concurrency=3)
    assert set(result) == {"msgs_per_s", "cpu_ms_per_msg", "seconds"}
    assert len(sink.received) == (0 if peer == "null" else 6)
    assert all(len(r.data) > 1900 for r in sink.received)
