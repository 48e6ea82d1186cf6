"""The admin API over its Unix socket, on a live Queue over DictStorage with a manual clock."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpq import DictStorage, ManualClock, Queue, Reply
from smtpq.daemon.admin import AdminServer
from smtpq.daemon.client import AdminClient, AdminError
from smtpq.daemon.metrics import Metrics
from tests.helpers import ScriptedRelay, make_envelope, until
from tests.integration.smtp.conftest import free_port

GREYLIST = Reply("451", "4.7.1 Greylisted")


class Admin:
    def __init__(self, queue: Queue, relay: ScriptedRelay, client: AdminClient) -> None:
        self.queue, self.relay, self.client = queue, relay, client
        self.clock: ManualClock = queue.clock  # type: ignore[assignment]

    async def enqueue(self, sender: str, rcpts: list[str]) -> str:
        [(_, id)] = await self.queue.enqueue(make_envelope(sender, rcpts))
        assert isinstance(id, str)
        await until(lambda: self.queue.inflight == 0)
        return id

    async def listing(self, query: str = "") -> list[dict[str, Any]]:
        return [m async for m in self.client.lines(f"/queue?{query}")]


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    clock = ManualClock()
    relay = ScriptedRelay(lambda rcpt, n: None if rcpt.endswith("@ok.example") else GREYLIST)
    store = DictStorage()
    queue = Queue(store, relay, clock=clock, hostname="mx.test")
    metrics = Metrics(store, clock)
    queue.observers.append(metrics.observe)
    server = AdminServer(queue, metrics, socket_path=tmp_path / "admin.sock")
    async with queue:
        await server.start()
        try:
            yield Admin(queue, relay, AdminClient(tmp_path / "admin.sock"))
        finally:
            await server.stop()


async def test_socket_is_owner_only(admin: Admin, tmp_path: Path) -> None:
    assert (tmp_path / "admin.sock").stat().st_mode & 0o777 == 0o600
    assert await admin.client.available()


async def test_list_filters_and_show(admin: Admin) -> None:
    a = await admin.enqueue("s@one.example", ["x@slow.example", "y@ok.example"])
    await admin.clock.advance(200)  # less than the first retry delay (300 s +- 10%)
    b = await admin.enqueue("s@two.example", ["z@other.example"])
    listing = await admin.listing()
    assert [m["id"] for m in listing] == [a, b]  # oldest first
    first = listing[0]
    assert first["recipients"] == ["x@slow.example"]  # y was delivered
    assert first["attempts"] == 1
    assert first["last_reply"] == "451 4.7.1 Greylisted"
    assert first["state"] == "deferred"
    assert [m["id"] for m in await admin.listing("recipient_domain=other.example")] == [b]
    assert [m["id"] for m in await admin.listing("sender_domain=one.example")] == [a]
    assert [m["id"] for m in await admin.listing("min_age=150s")] == [a]
    assert [m["id"] for m in await admin.listing("limit=1")] == [a]
    info = await admin.client.get(f"/queue/{a}?body=1")
    assert info["recipient_status"] == [
        {"recipient": "x@slow.example", "status": "pending"},
        {"recipient": "y@ok.example", "status": "done"},
    ]
    assert "Subject: test" in info["headers"]
    assert info["body"] == "Hello.\r\n"
    with pytest.raises(AdminError, match="no message"):
        await admin.client.get("/queue/" + "0" * 32)
    with pytest.raises(AdminError, match="no message"):
        await admin.client.get("/queue/..%2F..%2Fetc%2Fpasswd")


async def test_long_listing_streams_every_message_whole(admin: Admin) -> None:
    # Lines of several hundred bytes, several blocks of the stream: none split or lost.
    rcpt = "r" * 200 + "@slow.example"
    ids = [await admin.enqueue(f"s{i}@one.example", [rcpt, f"{i}{rcpt}"]) for i in range(400)]
    listing = await admin.listing()
    assert [m["id"] for m in listing] == sorted(ids)  # by id: all arrived at the same time
    for m in listing:
        i = ids.index(m["id"])
        assert (m["sender"], m["recipients"]) == (f"s{i}@one.example", [rcpt, f"{i}{rcpt}"])
    blocks = [block async for block in admin.client.blocks("/queue")]
    assert len(blocks) > 1
    assert [json.loads(line)["id"] for block in blocks for line in block] == sorted(ids)


async def test_flush_causes_an_attempt(admin: Admin) -> None:
    id = await admin.enqueue("s@one.example", ["x@slow.example"])
    assert len(admin.relay.calls) == 1
    result = await admin.client.post("/queue/flush", {"ids": [id]})
    assert result == {"count": 1}
    await until(lambda: len(admin.relay.calls) == 2)


async def test_hold_blocks_attempts_until_release(admin: Admin) -> None:
    id = await admin.enqueue("s@one.example", ["x@slow.example"])
    assert (await admin.client.post("/queue/hold", {"ids": [id]}))["count"] == 1
    [m] = await admin.listing()
    assert m["state"] == "held"
    await admin.clock.advance(86400)
    await admin.client.post("/queue/flush", {"all": True})
    for _ in range(50):
        await admin.clock.advance(1)
    assert len(admin.relay.calls) == 1
    await admin.client.post("/queue/release", {"ids": [id]})
    await until(lambda: len(admin.relay.calls) == 2)


async def test_delete_and_bounce(admin: Admin) -> None:
    a = await admin.enqueue("s@one.example", ["x@slow.example"])
    b = await admin.enqueue("s@two.example", ["x@slow.example"])
    assert (await admin.client.post("/queue/delete", {"ids": [a]}))["count"] == 1
    assert [m["id"] for m in await admin.listing()] == [b]
    assert (await admin.client.post("/queue/bounce", {"ids": [b]}))["count"] == 1
    # The bounce itself is now queued (to s@two.example, from the null sender).
    [bounce] = await admin.listing()
    assert bounce["sender"] == ""
    assert bounce["recipients"] == ["s@two.example"]
    env, _ = await admin.queue.store.get(bounce["id"])
    text = b"".join(env.flatten())
    assert b"Delivery cancelled by the administrator" in text
    assert b"last reply: 451 4.7.1 Greylisted" in text


async def test_requeue_gives_a_new_id_and_resets_attempts(admin: Admin) -> None:
    a = await admin.enqueue("s@one.example", ["x@slow.example"])
    result = await admin.client.post("/queue/requeue", {"ids": [a]})
    assert result["count"] == 1
    [new] = result["ids"]
    assert new != a
    await until(lambda: len(admin.relay.calls) == 2)
    await until(lambda: admin.queue.inflight == 0)
    [m] = await admin.listing()
    assert m["id"] == new


async def test_action_needs_a_selection(admin: Admin) -> None:
    with pytest.raises(AdminError, match="name the messages"):
        await admin.client.post("/queue/delete", {})
    with pytest.raises(AdminError, match="state must be"):
        await admin.client.post("/queue/delete", {"state": "lost"})


async def test_shape_counts_by_domain_and_age(admin: Admin) -> None:
    await admin.enqueue("s@one.example", ["a@slow.example", "b@slow.example"])
    await admin.queue.store.set_held((await admin.listing())[0]["id"], True)  # no retries
    await admin.clock.advance(30 * 60)
    await admin.enqueue("s@one.example", ["c@other.example"])
    shape = await admin.client.get("/queue/shape")
    assert shape["buckets"] == [5, 10, 20, 40, 80, 160, 320, 640, 1280]
    rows = {r["domain"]: r["counts"] for r in shape["rows"]}
    # slow.example: 2 recipients aged 30 minutes -> the "40" bucket (20 <= age < 40).
    assert rows["slow.example"] == [2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0]
    assert rows["other.example"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert shape["total"][0] == 3
    assert shape["replies"]["slow.example"] == [["451 4.7.1 Greylisted", 2]]
    by_sender = await admin.client.get("/queue/shape?by=sender")
    assert [r["domain"] for r in by_sender["rows"]] == ["one.example"]


async def test_metrics_parse_and_match(admin: Admin) -> None:
    await admin.enqueue("s@one.example", ["x@slow.example", "y@ok.example"])
    await admin.enqueue("s@one.example", ["z@ok.example"])
    await admin.clock.advance(120)
    text = await admin.client.get_text("/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("smtpq_messages_accepted_total", ())] == 2
    assert samples[("smtpq_recipients_delivered_total", ())] == 2
    assert samples[("smtpq_recipients_deferred_total", ())] == 1
    assert samples[("smtpq_queue_messages", (("state", "deferred"),))] == 1
    assert samples[("smtpq_oldest_message_age_seconds", ())] == pytest.approx(120, abs=1)
    assert samples[("smtpq_delivery_attempt_seconds_count", ())] == 2
    assert samples[("smtpq_storage_write_seconds_count", ())] == 2


async def test_actions_are_logged_with_the_peer_uid(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    by = f"by=uid:{os.getuid()}"
    a = await admin.enqueue("s@one.example", ["x@slow.example"])
    b = await admin.enqueue("s@two.example", ["y@slow.example"])
    c = await admin.enqueue("s@two.example", ["z@slow.example"])
    await admin.client.post("/queue/hold", {"ids": [a]})
    await admin.client.post("/queue/release", {"ids": [a]})
    await admin.client.post("/queue/flush", {"ids": [a]})
    await admin.client.post("/queue/delete", {"ids": [c]})
    [new] = (await admin.client.post("/queue/requeue", {"ids": [b]}))["ids"]
    await until(lambda: admin.queue.inflight == 0)
    assert (await admin.client.post("/queue/bounce", {"ids": [new]}))["count"] == 1
    await until(lambda: admin.queue.inflight == 0)
    assert (await admin.client.post("/queue/flush", {}))["count"] == 2  # no body: a and the DSN
    lines = [r.getMessage() for r in caplog.records]
    assert f"held id={a} {by}" in lines
    assert f"released id={a} {by}" in lines
    assert f"flushed id={a} {by}" in lines
    assert f"deleted id={c} to=<z@slow.example> {by}" in lines
    assert f"requeued id={b} to=<y@slow.example> new={new} {by}" in lines
    [bounced] = [line for line in lines if line.startswith(f"bounced id={new} ")]
    dsn = next(m["id"] for m in await admin.listing() if m["sender"] == "")
    assert bounced == (
        f'bounced id={new} to=<y@slow.example> reply="550 5.0.0 Delivery cancelled by the'
        f' administrator" dsn={dsn} {by}'
    )
    assert f"flushed all: 2 messages {by}" in lines
    # Nothing is logged for what was not done: a message that is gone.
    await admin.client.post("/queue/hold", {"ids": [c]})
    assert f"held id={c} {by}" not in [r.getMessage() for r in caplog.records]
    # An operator's bounce counts as a bounce; every action is counted per message.
    text = await admin.client.get_text("/metrics")
    samples = {
        (s.name, s.labels.get("action")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("smtpq_recipients_bounced_total", None)] == 1
    actions = {a: v for (n, a), v in samples.items() if n == "smtpq_operator_actions_total"}
    assert actions == {
        "held": 1, "released": 1, "flushed": 1, "deleted": 1, "requeued": 1, "bounced": 1
    }  # fmt: skip


async def _tcp_post(port: int, path: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    response = await reader.read()
    writer.close()
    head, _, text = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(text)


async def test_actions_over_tcp_are_logged_as_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store, clock = DictStorage(), ManualClock()
    queue = Queue(store, ScriptedRelay(lambda rcpt, n: GREYLIST), clock=clock, hostname="mx")
    port = free_port()
    server = AdminServer(
        queue, Metrics(store, clock), socket_path=None, tcp=("127.0.0.1", port), token="s3cret"
    )
    async with queue:
        await server.start()
        try:
            [(_, id)] = await queue.enqueue(make_envelope())
            await until(lambda: queue.inflight == 0)
            assert await _tcp_post(port, "/queue/hold", {"ids": [id]}, "wrong") == (
                401, {"error": "a valid admin token is required"}
            )  # fmt: skip
            assert await _tcp_post(port, "/queue/hold", {"ids": [id]}, "s3cret") == (
                200, {"count": 1}
            )  # fmt: skip
        finally:
            await server.stop()
    assert f"held id={id} by=token" in [r.getMessage() for r in caplog.records]


async def test_a_live_admin_socket_is_never_taken(
    admin: Admin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A second server on the path of a live one (another daemon, a worker of a shared queue):
    # it leaves the socket alone, and stopping it does not remove the first one's.
    path = tmp_path / "admin.sock"
    second = AdminServer(admin.queue, Metrics(admin.queue.store, admin.clock), socket_path=path)
    await second.start()
    assert f"admin socket {path} is served by another process" in caplog.text
    await second.stop()
    assert path.exists()
    assert await admin.client.available()


async def test_a_stale_admin_socket_is_replaced_and_other_files_are_kept(tmp_path: Path) -> None:
    store, clock = DictStorage(), ManualClock()
    queue = Queue(store, None, clock=clock, hostname="mx")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: a dead daemon's
        dead.bind(str(stale))
    server = AdminServer(queue, Metrics(store, clock), socket_path=stale)
    await server.start()
    assert await AdminClient(stale).available()
    await server.stop()
    assert not stale.exists()

    precious = tmp_path / "precious"
    precious.write_text("not a socket")
    server = AdminServer(queue, Metrics(store, clock), socket_path=precious)
    with pytest.raises(OSError, match="in use"):
        await server.start()
    assert precious.read_text() == "not a socket"
