"""The storage contract (DESIGN §2), run over every backend."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from smtpq.envelope import Envelope
from smtpq.errors import MessageGone
from smtpq.reply import Reply
from smtpq.storage import QueueStorage
from tests.contract.conftest import Backend

NOW = 1_800_000_000.0


def make_envelope(n_rcpts: int = 3) -> Envelope:
    env = Envelope("sender@example.org", [f"r{i}@example.com" for i in range(n_rcpts)])
    env.parse(b"From: sender@example.org\r\nSubject: contract\r\n\r\nbody line\r\n")
    env.timestamp = NOW
    env.client = {"ip": "127.0.0.1", "name": "client.example"}
    return env


async def test_write_then_get_returns_equal_envelope(backend: Backend) -> None:
    store = backend.storage
    env = make_envelope()
    id = await store.write(env, NOW)
    got, attempts = await store.get(id)
    assert attempts == 0
    assert got.sender == env.sender
    assert got.recipients == env.recipients
    assert got.flatten() == env.flatten()
    assert got.client == env.client
    assert got.timestamp == env.timestamp


async def test_get_returns_a_copy_not_the_stored_object(backend: Backend) -> None:
    store = backend.storage
    env = make_envelope()
    id = await store.write(env, NOW)
    env.recipients.append("late@example.com")
    got, _ = await store.get(id)
    got.recipients.clear()
    again, _ = await store.get(id)
    assert again.recipients == ["r0@example.com", "r1@example.com", "r2@example.com"]


async def test_ids_are_unique(backend: Backend) -> None:
    ids = {await backend.storage.write(make_envelope(1), NOW) for _ in range(50)}
    assert len(ids) == 50


async def test_get_unknown_raises_message_gone(backend: Backend) -> None:
    with pytest.raises(MessageGone) as caught:
        await backend.storage.get("0123456789abcdef0123456789abcdef")
    assert isinstance(caught.value, KeyError)  # callers catching KeyError keep working
    assert caught.value.id == "0123456789abcdef0123456789abcdef"


GONE_CALLS: dict[str, Callable[[QueueStorage, str], Awaitable[Any]]] = {
    "get": lambda store, id: store.get(id),
    "get_entry": lambda store, id: store.get_entry(id),
    "set_timestamp": lambda store, id: store.set_timestamp(id, NOW + 60),
    "increment_attempts": lambda store, id: store.increment_attempts(id),
    "set_recipients_delivered": lambda store, id: store.set_recipients_delivered(id, [0]),
    "set_held": lambda store, id: store.set_held(id, True),
}


@pytest.mark.parametrize("call", sorted(GONE_CALLS))
async def test_a_removed_message_is_message_gone(backend: Backend, call: str) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    await store.remove(id)
    with pytest.raises(MessageGone) as caught:
        await GONE_CALLS[call](store, id)
    assert caught.value.id == id
    assert await store.load() == []  # nothing was brought back by the failed call


async def test_increment_attempts_counts_up(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    assert await store.increment_attempts(id) == 1
    assert await store.increment_attempts(id) == 2
    assert (await store.get(id))[1] == 2


async def test_set_timestamp_is_loaded(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    await store.set_timestamp(id, NOW + 300, last_reply=Reply("451", "4.7.1 greylisted"))
    assert (NOW + 300, id) in await store.load()
    entry = await store.get_entry(id)
    assert entry.timestamp == NOW + 300
    assert entry.last_reply == Reply("451", "4.7.1 greylisted")


async def test_last_reply_keeps_every_field_across_a_reopen(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    reply = Reply(
        "250", "2.0.0 Ok", "DATA", "a@b", remote_host="mx", remote_ip="::1", remote_dsn=False
    )
    await store.set_timestamp(id, NOW + 300, last_reply=reply)
    other = await backend.reopen()
    try:
        assert (NOW + 300, id) in await other.load()
        kept = (await other.get_entry(id)).last_reply
        assert kept is not None
        assert (kept.as_sent(), kept.remote_ip, kept.remote_dsn) == ("250 2.0.0 Ok", "::1", False)
        assert (await other.get_info()).get("corrupt", 0) == 0
    finally:
        if other is not store:
            await other.close()


async def test_delivered_recipients_are_omitted_with_original_indexes(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(4), NOW)
    await store.set_recipients_delivered(id, [1])
    await store.set_recipients_delivered(id, iter([3, 1]))  # idempotent, any iterable
    entry = await store.get_entry(id)
    assert entry.envelope.recipients == ["r0@example.com", "r2@example.com"]
    assert entry.pending == (0, 2)
    # Indexes refer to the list as first written, not to the pending list.
    await store.set_recipients_delivered(id, {2})
    entry = await store.get_entry(id)
    assert entry.envelope.recipients == ["r0@example.com"]
    assert entry.pending == (0,)


async def test_remove_is_idempotent(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    await store.remove(id)
    await store.remove(id)
    with pytest.raises(MessageGone):
        await store.get(id)
    assert id not in [i for _, i in await store.load()]


async def test_get_info_counts_messages(backend: Backend) -> None:
    store = backend.storage
    ids = [await store.write(make_envelope(), NOW) for _ in range(3)]
    assert (await store.get_info())["size"] == 3
    await store.remove(ids[0])
    assert (await store.get_info())["size"] == 2


async def test_load_lists_everything(backend: Backend) -> None:
    store = backend.storage
    ids = {await store.write(make_envelope(), NOW + i) for i in range(5)}
    loaded = await store.load()
    assert {i for _, i in loaded} == ids
    assert sorted(t for t, _ in loaded) == [NOW + i for i in range(5)]


async def test_message_ids_oldest_first(backend: Backend) -> None:
    store = backend.storage
    ids = [await store.write(make_envelope(), NOW + i) for i in range(5)]
    await store.remove(ids[2])
    assert await store.message_ids() == [ids[0], ids[1], ids[3], ids[4]]


async def test_iter_ids_pages_oldest_first(backend: Backend) -> None:
    store = backend.storage
    ids = [await store.write(make_envelope(1), NOW + i) for i in range(8)]
    await store.remove(ids[3])
    pages = [page async for page in store.iter_ids(3)]
    assert pages == [ids[:3], ids[4:7], ids[7:]]
    assert [page async for page in store.iter_ids()] == [ids[:3] + ids[4:]]


async def test_get_infos_lists_without_the_content(backend: Backend) -> None:
    store = backend.storage
    env = make_envelope(3)
    id = await store.write(env, NOW)
    other = await store.write(make_envelope(1), NOW + 1)
    await store.set_recipients_delivered(id, [1])
    await store.increment_attempts(id)
    reply = Reply("451", "4.7.1 Try later", "RCPT", remote_host="mx.example.com")
    await store.set_timestamp(id, NOW + 300, last_reply=reply)
    await store.set_held(id, True)
    gone = await store.write(make_envelope(1), NOW)
    await store.remove(gone)
    infos = await store.get_infos([other, gone, id, "not an id", "0" * 32])
    assert [i.id for i in infos] == [other, id]
    info = infos[1]
    assert info.sender == "sender@example.org"
    assert info.recipients == ("r0@example.com", "r2@example.com")
    assert info.size == len(env)
    assert info.arrival == NOW
    assert (info.attempts, info.timestamp, info.held) == (1, NOW + 300, True)
    assert info.last_reply is not None
    assert str(info.last_reply) == str(reply)
    assert (infos[0].recipients, infos[0].held, infos[0].last_reply) == (
        ("r0@example.com",),
        False,
        None,
    )
    assert await store.get_infos([]) == []


async def test_get_infos_of_a_message_with_large_metadata(backend: Backend) -> None:
    env = make_envelope(400)  # metadata of more than 8 KB
    id = await backend.storage.write(env, NOW)
    [info] = await backend.storage.get_infos([id])
    assert info.recipients == tuple(env.recipients)
    assert info.size == len(env)


async def test_a_reopened_storage_lists_before_it_loads(backend: Backend) -> None:
    store = backend.storage
    ids = [await store.write(make_envelope(2), NOW + i) for i in range(3)]
    other = await backend.reopen()
    try:
        listed = [id async for page in other.iter_ids(2) for id in page]
        assert listed == ids
        assert [i.id for i in await other.get_infos(listed)] == ids
    finally:
        if other is not store:
            await other.close()


async def test_binary_and_utf8_content_round_trips(backend: Backend) -> None:
    store = backend.storage
    env = Envelope("jöran@exämple.org", ["ünï@example.com"])
    env.parse(b"Subject: =?utf-8?q?x?=\r\nX-Raw: \xff\xfe\r\n\r\n" + bytes(range(256)) * 40)
    env.smtputf8 = True
    id = await store.write(env, NOW)
    got, _ = await store.get(id)
    assert got.flatten() == env.flatten()
    assert got.sender == "jöran@exämple.org"
    assert got.smtputf8


# -- schedule ----------------------------------------------------------------------------------


async def test_claim_takes_due_messages_once(backend: Backend) -> None:
    store = backend.storage
    due = await store.write(make_envelope(), NOW)
    later = await store.write(make_envelope(), NOW + 2)  # before `due`'s lease ends
    assert await store.claim(NOW, 10) == [due]
    assert await store.claim(NOW, 10) == []  # leased
    assert await store.claim(NOW + 2, 10) == [later]


async def test_claim_respects_limit(backend: Backend) -> None:
    store = backend.storage
    for _ in range(5):
        await store.write(make_envelope(), NOW)
    first = await store.claim(NOW, 2)
    second = await store.claim(NOW, 10)
    assert len(first) == 2
    assert len(second) == 3
    assert not set(first) & set(second)


async def test_written_claimed_is_not_claimable(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW, claimed=True)
    assert await store.claim(NOW, 10) == []
    # The lease runs out when it is not renewed: another worker may take the message.
    assert await store.claim(NOW + store.lease_timeout + 1, 10) == [id]


async def test_renew_extends_lease(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    assert await store.claim(NOW, 1) == [id]
    await store.renew([id], NOW + store.lease_timeout - 1)
    assert await store.claim(NOW + store.lease_timeout + 1, 10) == []
    assert await store.claim(NOW + 2 * store.lease_timeout + 1, 10) == [id]


async def test_set_timestamp_ends_the_lease(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    assert await store.claim(NOW, 1) == [id]
    await store.set_timestamp(id, NOW + 10)
    assert await store.claim(NOW + 5, 10) == []
    assert await store.claim(NOW + 10, 10) == [id]


async def test_release_keeps_the_time(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW, claimed=True)
    await store.release(id)
    assert await store.claim(NOW, 10) == [id]


async def test_removed_message_is_not_claimed(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    await store.remove(id)
    assert await store.claim(NOW + 1000, 10) == []


async def test_next_due(backend: Backend) -> None:
    store = backend.storage
    assert await store.next_due() is None
    await store.write(make_envelope(), NOW + 50)
    await store.write(make_envelope(), NOW + 20)
    assert await store.next_due() == pytest.approx(NOW + 20)


async def test_held_message_is_never_claimed_until_released(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(), NOW)
    await store.set_held(id, True)
    assert await store.claim(NOW + 10_000, 10) == []
    assert (await store.get_entry(id)).held
    await store.set_held(id, False)
    assert await store.claim(NOW + 10_000, 10) == [id]


async def test_flush_makes_deferred_due_but_leaves_leased(backend: Backend) -> None:
    store = backend.storage
    deferred = await store.write(make_envelope(), NOW + 3600)
    leased = await store.write(make_envelope(), NOW, claimed=True)
    assert await store.flush(NOW) == 1
    assert await store.claim(NOW, 10) == [deferred]
    assert leased  # still leased: not claimable before its lease ends
    assert await store.claim(NOW + 1, 10) == []


async def test_wait_is_woken_by_write(backend: Backend) -> None:
    store = backend.storage
    await store.wait(0.01)  # consume anything pending
    waiter = asyncio.create_task(store.wait(30))
    await asyncio.sleep(0.05)
    await store.write(make_envelope(), NOW)
    await asyncio.wait_for(waiter, 5)


async def test_wait_times_out(backend: Backend) -> None:
    store = backend.storage
    await store.wait(0.01)
    await asyncio.wait_for(store.wait(0.05), 5)


# -- persistence across storage objects ---------------------------------------------------------


async def test_reopen_sees_state(backend: Backend) -> None:
    store = backend.storage
    id = await store.write(make_envelope(3), NOW)
    await store.set_recipients_delivered(id, [0])
    await store.increment_attempts(id)
    await store.set_timestamp(id, NOW + 60)
    held = await store.write(make_envelope(1), NOW)
    await store.set_held(held, True)
    other = await backend.reopen()
    try:
        loaded = dict((i, t) for t, i in await other.load())
        assert loaded[id] == NOW + 60
        entry = await other.get_entry(id)
        assert entry.attempts == 1
        assert entry.pending == (1, 2)
        assert (await other.get_entry(held)).held
        assert await other.claim(NOW + 10_000, 10) == [id]
    finally:
        if other is not store:
            await other.close()


async def test_storage_is_a_queue_storage(backend: Backend) -> None:
    assert isinstance(backend.storage, QueueStorage)
