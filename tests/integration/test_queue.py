"""The Queue over DictStorage with a scripted relay and a manual clock: DESIGN §3 scenarios."""

from __future__ import annotations

import asyncio
import email
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from smtpq import (
    DictStorage,
    Envelope,
    ManualClock,
    PermanentRelayError,
    Queue,
    QueueError,
    Relay,
    RelayResult,
    Reply,
    TransientRelayError,
    exponential_backoff,
)
from smtpq.policy import RecipientDomainSplit
from smtpq.queue.driver import RECORD_RETRY_DELAY, RECORD_RETRY_FIRST
from tests.dsn_grammar import check_dsn
from tests.helpers import ScriptedRelay, make_envelope, until

OK = Reply("250", "2.0.0 Ok")
GREYLIST = Reply("451", "4.7.1 Greylisted, try later")
NO_USER = Reply("550", "5.1.1 No such user")


class Harness:
    """A queue whose relay is scripted and whose bounces land in a second, relay-less queue."""

    def __init__(
        self,
        relay: Relay,
        backoff: object = exponential_backoff,
        store: DictStorage | None = None,
        **options: Any,
    ) -> None:
        self.clock = ManualClock()
        self.store = store or DictStorage()
        self.bounce_store = DictStorage()
        self.bounces = Queue(self.bounce_store, clock=self.clock)
        self.relay = relay
        self.queue = Queue(
            self.store,
            relay,
            backoff=backoff,  # type: ignore[arg-type]
            bounce_queue=self.bounces,
            clock=self.clock,
            hostname="mx.test",
            **options,
        )

    async def size(self) -> int:
        return int((await self.store.get_info())["size"])

    async def bounce_messages(self) -> list[Envelope]:
        out = []
        for _, id in await self.bounce_store.load():
            out.append((await self.bounce_store.get(id))[0])
        return out

    async def drained(self) -> None:
        """Wait until no attempt is running and nothing is due now."""
        await until(lambda: self.queue.inflight == 0)
        for _ in range(20):
            await asyncio.sleep(0)
        await until(lambda: self.queue.inflight == 0)


@pytest.fixture
def scripted() -> ScriptedRelay:
    return ScriptedRelay()


def calls_reach(relay: ScriptedRelay, count: int) -> Callable[[], bool]:
    """A condition: the relay has been called ``count`` times."""
    return lambda: len(relay.calls) == count


async def enqueue_ok(queue: Queue, env: Envelope) -> list[str]:
    results = await queue.enqueue(env)
    ids = [r for _, r in results if isinstance(r, str)]
    assert len(ids) == len(results), results
    return ids


@pytest.fixture
async def harness(scripted: ScriptedRelay) -> AsyncIterator[Harness]:
    h = Harness(scripted)
    async with h.queue:
        yield h


async def test_success_removes(harness: Harness, scripted: ScriptedRelay) -> None:
    [id] = await enqueue_ok(harness.queue, make_envelope())
    await harness.drained()
    assert scripted.delivered == ["rcpt@example.com"]
    assert scripted.calls == [(["rcpt@example.com"], 0)]
    assert await harness.size() == 0
    with pytest.raises(KeyError):
        await harness.store.get(id)
    assert await harness.bounce_messages() == []


async def test_the_caller_has_its_ids_before_the_first_attempt_begins(
    harness: Harness, scripted: ScriptedRelay
) -> None:
    # As the edge waits for a store: a task, answered from its done callback. The answer (the
    # client's 250) must not wait for the attempt's work, which begins on the next turn.
    # It counts as in flight from the start all the same.
    when_answered: list[tuple[int, int]] = []
    task = asyncio.create_task(enqueue_ok(harness.queue, make_envelope()))
    task.add_done_callback(
        lambda _: when_answered.append((len(scripted.calls), harness.queue.inflight))
    )
    assert len(await task) == 1
    await harness.drained()
    assert when_answered == [(0, 1)]
    assert scripted.calls == [(["rcpt@example.com"], 0)]
    assert await harness.size() == 0


async def test_permanent_failure_bounces_once_and_removes(
    harness: Harness, scripted: ScriptedRelay
) -> None:
    scripted.script = lambda rcpt, n: NO_USER
    await enqueue_ok(harness.queue, make_envelope())
    await harness.drained()
    assert await harness.size() == 0
    [bounce] = await harness.bounce_messages()
    assert bounce.sender == ""
    assert bounce.recipients == ["sender@example.org"]
    report = email.message_from_bytes(b"".join(bounce.flatten()))
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text = b"".join(bounce.flatten())
    assert b"Final-Recipient: rfc822; rcpt@example.com" in text
    assert b"Status: 5.1.1" in text
    assert b"Action: failed" in text
    # The scripted relay's replies come from no remote host: locally generated.
    assert b"Diagnostic-Code: x-local; 550 5.1.1 No such user" in text
    assert len(scripted.calls) == 1


async def test_transient_retries_on_schedule_then_bounces_once(
    harness: Harness, scripted: ScriptedRelay
) -> None:
    scripted.script = lambda rcpt, n: GREYLIST
    [id] = await enqueue_ok(harness.queue, make_envelope())
    await harness.drained()
    assert len(scripted.calls) == 1
    start = harness.clock.time()
    for attempts in range(1, 6):
        entry = await harness.store.get_entry(id)
        assert entry.attempts == attempts
        assert entry.last_reply == GREYLIST
        # exponential_backoff: 12 * 5**attempts seconds after the failed attempt.
        wait = 12.0 * 5.0**attempts
        assert entry.timestamp == pytest.approx(harness.clock.time() + wait)
        await harness.clock.advance(wait - 1)
        await harness.drained()
        assert len(scripted.calls) == attempts  # not yet
        await harness.clock.advance(1)
        await until(calls_reach(scripted, attempts + 1))
        await harness.drained()
        assert scripted.calls[-1] == (["rcpt@example.com"], attempts)
    # The sixth failure: exponential_backoff returns None, so the queue gives up.
    assert harness.clock.time() - start == pytest.approx(sum(12.0 * 5.0**a for a in range(1, 6)))
    assert await harness.size() == 0
    [bounce] = await harness.bounce_messages()
    dsn = check_dsn(b"".join(bounce.flatten()))
    [fields] = dsn.recipients
    assert fields["Status"] == "4.7.1"  # the last reply's status, Action: failed
    assert fields["Action"] == "failed"
    assert fields["Diagnostic-Code"] == "x-local; 451 4.7.1 Greylisted, try later"
    human = " ".join(dsn.human.split())
    assert "given up after 13 hours 1 minute and 6 attempts: retries exhausted" in human


async def test_mixed_recipients_each_handled_exactly_once(
    harness: Harness, scripted: ScriptedRelay
) -> None:
    answers = {
        "a@example.com": OK,
        "b@example.com": GREYLIST,
        "c@example.com": NO_USER,
        "d@example.com": None,
    }
    scripted.script = lambda rcpt, n: answers[rcpt]
    [id] = await enqueue_ok(harness.queue, make_envelope(recipients=list(answers)))
    await harness.drained()
    entry = await harness.store.get_entry(id)
    assert entry.envelope.recipients == ["b@example.com"]
    assert entry.pending == (1,)
    [bounce] = await harness.bounce_messages()
    assert b"Final-Recipient: rfc822; c@example.com" in b"".join(bounce.flatten())
    assert b"b@example.com" not in bounce.flatten()[1].split(b"message/rfc822")[0]
    # Retries go to b only, until the backoff gives up.
    for attempts in range(1, 6):
        await harness.clock.advance(12.0 * 5.0**attempts)
        await until(calls_reach(scripted, attempts + 1))
        await harness.drained()
    assert [rcpts for rcpts, _ in scripted.calls[1:]] == [["b@example.com"]] * 5
    assert sorted(scripted.delivered) == ["a@example.com", "d@example.com"]
    assert scripted.attempts_for("a@example.com") == 1
    assert scripted.attempts_for("c@example.com") == 1
    assert scripted.attempts_for("d@example.com") == 1
    assert await harness.size() == 0
    bounces = await harness.bounce_messages()
    assert len(bounces) == 2
    finals = sorted(
        line
        for b in bounces
        for line in b"".join(b.flatten()).splitlines()
        if line.startswith(b"Final-Recipient")
    )
    assert finals == [
        b"Final-Recipient: rfc822; b@example.com",
        b"Final-Recipient: rfc822; c@example.com",
    ]


async def test_null_sender_is_never_bounced(harness: Harness, scripted: ScriptedRelay) -> None:
    scripted.script = lambda rcpt, n: NO_USER
    await enqueue_ok(harness.queue, make_envelope(sender=""))
    await harness.drained()
    assert await harness.size() == 0
    assert await harness.bounce_messages() == []


async def test_null_sender_gives_up_without_bounce(
    harness: Harness, scripted: ScriptedRelay
) -> None:
    scripted.script = lambda rcpt, n: GREYLIST
    await enqueue_ok(harness.queue, make_envelope(sender=""))
    await harness.drained()
    for attempts in range(1, 6):
        await harness.clock.advance(12.0 * 5.0**attempts)
        await until(calls_reach(scripted, attempts + 1))
        await harness.drained()
    assert await harness.size() == 0
    assert await harness.bounce_messages() == []


class ExplodingRelay(Relay):
    """Raises a bug-like exception on the first attempt, then delivers."""

    def __init__(self) -> None:
        self.calls = 0

    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        self.calls += 1
        if self.calls == 1:
            raise ZeroDivisionError("a bug in the relay")
        return Reply("250", "Ok")


async def test_unexpected_exception_is_transient_and_queue_keeps_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = ExplodingRelay()
    h = Harness(relay)
    async with h.queue:
        [id] = await enqueue_ok(h.queue, make_envelope())
        await h.drained()
        entry = await h.store.get_entry(id)
        assert entry.attempts == 1
        assert entry.last_reply is not None
        assert entry.last_reply.code == "450"
        assert entry.last_reply.enhanced_status_code == "4.0.0"
        assert "ZeroDivisionError" in caplog.text
        # The queue still works: another message goes through, and the retry delivers.
        await enqueue_ok(h.queue, make_envelope(recipients=["other@example.com"]))
        await h.drained()
        assert relay.calls == 2
        await h.clock.advance(60)
        await until(lambda: relay.calls == 3)
        await h.drained()
        assert await h.size() == 0


class WholeRelay(Relay):
    """Raises the given error for the whole message."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        raise self.error


async def test_permanent_relay_error_bounces_all_recipients() -> None:
    h = Harness(WholeRelay(PermanentRelayError("rejected", Reply("554", "5.7.1 Spam"))))
    async with h.queue:
        await enqueue_ok(h.queue, make_envelope(recipients=["a@x.example", "b@x.example"]))
        await h.drained()
    [bounce] = await h.bounce_messages()
    text = b"".join(bounce.flatten())
    assert text.count(b"Action: failed") == 2
    assert b"Status: 5.7.1" in text
    assert await h.size() == 0


async def test_transient_relay_error_defers() -> None:
    h = Harness(WholeRelay(TransientRelayError("down")))
    async with h.queue:
        [id] = await enqueue_ok(h.queue, make_envelope())
        await h.drained()
        entry = await h.store.get_entry(id)
    assert entry.attempts == 1
    assert entry.last_reply == Reply("450", "4.0.0 down")


async def test_missing_recipient_in_result_is_transient() -> None:
    class Partial(Relay):
        async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
            return {envelope.recipients[0]: None}

    h = Harness(Partial())
    async with h.queue:
        [id] = await enqueue_ok(h.queue, make_envelope(recipients=["a@x.example", "b@x.example"]))
        await h.drained()
        entry = await h.store.get_entry(id)
    assert entry.envelope.recipients == ["b@x.example"]
    assert entry.last_reply is not None
    assert entry.last_reply.code == "450"


async def test_edge_only_queue_stores_due_and_unclaimed() -> None:
    clock = ManualClock()
    store = DictStorage()
    async with Queue(store, clock=clock) as edge:
        [id] = await enqueue_ok(edge, make_envelope())
    assert await store.claim(clock.time(), 10) == [id]


async def test_restart_resumes_stored_schedule(scripted: ScriptedRelay) -> None:
    h = Harness(scripted)
    scripted.script = lambda rcpt, n: GREYLIST if n == 0 else None
    async with h.queue:
        [id] = await enqueue_ok(h.queue, make_envelope())
        await h.drained()
    assert (await h.store.get_entry(id)).attempts == 1
    # A new Queue on a reopened storage picks the message up when it falls due.
    store = DictStorage(h.store.env_db, h.store.meta_db)
    queue = Queue(store, scripted, backoff=exponential_backoff, clock=h.clock)
    async with queue:
        await h.clock.advance(59)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(scripted.calls) == 1
        await h.clock.advance(1)
        await until(lambda: len(scripted.calls) == 2)
        await until(lambda: queue.inflight == 0)
    assert (await store.get_info())["size"] == 0


class StoreFailing(DictStorage):
    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        raise OSError(28, "No space left on device")


async def test_store_failure_is_a_queue_error() -> None:
    queue = Queue(StoreFailing(), ScriptedRelay(), clock=ManualClock())
    async with queue:
        [(_, result)] = await queue.enqueue(make_envelope())
    assert isinstance(result, QueueError)
    assert result.reply.code == "451"
    assert result.reply.enhanced_status_code == "4.3.0"


async def test_policy_split_gives_one_id_per_envelope(scripted: ScriptedRelay) -> None:
    h = Harness(scripted)
    h.queue.add_policy(RecipientDomainSplit())
    async with h.queue:
        results = await h.queue.enqueue(
            make_envelope(recipients=["a@one.example", "b@two.example", "c@one.example"])
        )
        await h.drained()
    assert [env.recipients for env, _ in results] == [
        ["a@one.example", "c@one.example"],
        ["b@two.example"],
    ]
    assert all(isinstance(r, str) for _, r in results)
    assert sorted(scripted.delivered) == ["a@one.example", "b@two.example", "c@one.example"]


async def test_flush_attempts_deferred_now(harness: Harness, scripted: ScriptedRelay) -> None:
    scripted.script = lambda rcpt, n: GREYLIST if n == 0 else None
    await enqueue_ok(harness.queue, make_envelope())
    await harness.drained()
    assert len(scripted.calls) == 1
    assert await harness.queue.flush() == 1
    await until(lambda: len(scripted.calls) == 2)
    await harness.drained()
    assert await harness.size() == 0


class SlowRelay(Relay):
    """Blocks until released."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def attempt(self, envelope: Envelope, attempts: int) -> RelayResult:
        self.started.set()
        await self.release.wait()
        return None


async def test_stop_waits_for_running_attempts_within_grace() -> None:
    relay = SlowRelay()
    h = Harness(relay)
    await h.queue.start()
    await enqueue_ok(h.queue, make_envelope())
    await relay.started.wait()
    stopping = asyncio.create_task(h.queue.stop(grace_period=30))
    await asyncio.sleep(0.01)
    assert not stopping.done()
    relay.release.set()
    await stopping
    assert await h.size() == 0


async def test_stop_after_grace_keeps_message_and_releases_lease() -> None:
    relay = SlowRelay()
    h = Harness(relay)
    await h.queue.start()
    [id] = await enqueue_ok(h.queue, make_envelope())
    await relay.started.wait()
    await h.queue.stop(grace_period=0.01)
    assert await h.size() == 1
    # Released, not left leased: it is claimable at once by the next worker.
    assert await h.store.claim(h.clock.time(), 10) == [id]


async def test_lease_is_renewed_during_a_long_attempt() -> None:
    relay = SlowRelay()
    h = Harness(relay)
    async with h.queue:
        [id] = await enqueue_ok(h.queue, make_envelope())
        await relay.started.wait()
        for _ in range(5):  # five lease periods pass while the attempt runs
            await h.clock.advance(h.store.lease_timeout)
        # Still leased to us: another worker cannot claim it.
        assert await h.store.claim(h.clock.time(), 10) == []
        relay.release.set()
        await h.drained()
    assert await h.size() == 0
    assert id


async def test_delay_warning_sent_once_honouring_notify(scripted: ScriptedRelay) -> None:
    scripted.script = lambda rcpt, n: GREYLIST if n < 3 else None
    h = Harness(scripted, backoff=lambda env, n: 3600.0, delay_warnings=[2 * 3600.0])
    env = make_envelope(recipients=["a@x.example", "b@x.example"])
    env.rcpt_params["b@x.example"] = {"NOTIFY": "FAILURE"}  # asked for no delay notices
    async with h.queue:
        await enqueue_ok(h.queue, env)
        await h.drained()
        for n in (2, 3, 4):
            await h.clock.advance(3600)
            await until(calls_reach(scripted, n))
            await h.drained()
    assert await h.size() == 0
    [notice] = await h.bounce_messages()  # one warning, from the attempt 2 hours in
    text = b"".join(notice.flatten())
    assert b"Action: delayed" in text
    assert b"Final-Recipient: rfc822; a@x.example" in text
    assert b"b@x.example" not in text.split(b"message/rfc822")[0]
    assert b"Status: 4.7.1" in text


class FailingStore(DictStorage):
    """Fails the first ``times`` calls of ``set_timestamp`` (a full disk, say), then works."""

    def __init__(self, times: int = 1) -> None:
        super().__init__()
        self.failures = 0
        self.times = times

    async def set_timestamp(
        self, id: str, timestamp: float, *, last_reply: Reply | None = None
    ) -> None:
        if self.failures < self.times:
            self.failures += 1
            raise QueueError("no space left on device")
        await super().set_timestamp(id, timestamp, last_reply=last_reply)


async def test_a_storage_failure_while_recording_is_one_line_and_retried(
    scripted: ScriptedRelay, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.script = lambda rcpt, n: GREYLIST if rcpt.startswith("late") else None
    store = FailingStore()
    h = Harness(scripted, backoff=lambda env, n: 300.0, store=store)
    caplog.set_level(logging.INFO, logger="smtpq.queue")
    async with h.queue:
        start = h.clock.time()
        [id] = await enqueue_ok(
            h.queue, make_envelope(recipients=["ok@x.example", "late@x.example"])
        )
        await h.drained()
        failures = [r for r in caplog.records if "recording the outcome" in r.getMessage()]
        assert len(failures) == 1
        assert failures[0].exc_info is None  # one line, no traceback
        assert "no space left on device" in failures[0].getMessage()
        # What was recorded before the failure stays; the lease stays with us meanwhile.
        entry = await store.get_entry(id)
        assert entry.envelope.recipients == ["late@x.example"]
        assert await store.claim(start + 30, 10) == []
        await h.clock.advance(RECORD_RETRY_FIRST)
        await until(lambda: "deferred id=" in caplog.text)
        entry = await store.get_entry(id)
        assert (entry.attempts, entry.timestamp) == (1, start + 300)
        # Retried on its schedule (not at once), and ok@ was delivered only once.
        await h.clock.advance(300 - RECORD_RETRY_FIRST - 1)
        await h.drained()
        assert len(scripted.calls) == 1
        await h.clock.advance(1)
        await until(calls_reach(scripted, 2))
        await h.drained()
    assert scripted.delivered == ["ok@x.example"]
    assert scripted.calls[1] == (["late@x.example"], 1)


async def test_a_recording_retried_sooner_first_then_less_often(
    scripted: ScriptedRelay, caplog: pytest.LogCaptureFixture
) -> None:
    # A storage back after a short outage is used again within seconds; a long outage is not
    # hammered: the delay doubles up to RECORD_RETRY_DELAY.
    scripted.script = lambda rcpt, n: GREYLIST
    store = FailingStore(times=8)
    h = Harness(scripted, backoff=lambda env, n: 3600.0, store=store)
    caplog.set_level(logging.INFO, logger="smtpq.queue")
    async with h.queue:
        [id] = await enqueue_ok(h.queue, make_envelope())
        await h.drained()
        for failures in range(1, 9):
            await until(lambda n=failures: store.failures == n)  # type: ignore[misc]
            await h.clock.advance(RECORD_RETRY_DELAY)
        await until(lambda: "deferred id=" in caplog.text)
    delays = [
        r.getMessage().rsplit(" ", 1)[1]
        for r in caplog.records
        if "recording the outcome" in r.getMessage()
    ]
    assert delays == ["1s", "2s", "4s", "8s", "16s", "32s", "60s", "60s"]
    assert (await store.get_entry(id)).attempts == 1


async def test_a_slimta_bounce_factory_makes_the_failure_bounces(scripted: ScriptedRelay) -> None:
    made: list[tuple[list[str], Reply]] = []

    def bounce_factory(envelope: Envelope, reply: Reply) -> Envelope | None:
        made.append((list(envelope.recipients), reply))
        bounce = Envelope("", [envelope.sender])
        bounce.parse(b"Subject: bounced\r\n\r\n" + str(reply).encode() + b"\r\n")
        return bounce

    other = Reply("550", "5.7.1 Refused")
    scripted.script = lambda rcpt, n: other if rcpt.startswith("b") else NO_USER
    h = Harness(scripted)
    h.queue = Queue(
        h.store, scripted, exponential_backoff, bounce_factory, h.bounces, clock=h.clock
    )
    async with h.queue:
        await enqueue_ok(
            h.queue, make_envelope(recipients=["a@x.example", "b@x.example", "c@x.example"])
        )
        await h.drained()
    assert made == [(["a@x.example", "c@x.example"], NO_USER), (["b@x.example"], other)]
    assert len(await h.bounce_messages()) == 2
    assert await h.size() == 0


async def test_notify_success_through_a_relay_that_is_not_smtp(scripted: ScriptedRelay) -> None:
    h = Harness(scripted)
    env = make_envelope(recipients=["a@x.example", "b@x.example"])
    env.rcpt_params["a@x.example"] = {"NOTIFY": "SUCCESS"}
    async with h.queue:
        await enqueue_ok(h.queue, env)
        await h.drained()
    # The relay gave no reply: whether a next hop reports is unknown, so smtpq reports relayed.
    [notice] = await h.bounce_messages()
    dsn = check_dsn(b"".join(notice.flatten()))
    [fields] = dsn.recipients
    assert fields["Final-Recipient"] == "rfc822; a@x.example"
    assert (fields["Action"], fields["Status"]) == ("relayed", "2.0.0")
    assert await h.size() == 0
