"""The daemon's log lines: their text form, and when they are written."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time

import pytest

from smtpq.daemon.logs import LineHandler, TextFormatter, configure_logging


class CountingStream(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def record(msg: str, *args: object, created: float = 1_800_000_000.25) -> logging.LogRecord:
    rec = logging.LogRecord("smtpq.queue", logging.INFO, __file__, 1, msg, args, None)
    rec.created = created
    return rec


def classic() -> logging.Formatter:
    """The formatter the text form was first made with."""
    formatter = logging.Formatter(
        "%(asctime)s smtpq[%(process)d] %(levelname)s %(name)s: %(message)s",
        "%Y-%m-%dT%H:%M:%SZ",
    )
    formatter.converter = time.gmtime
    return formatter


def test_text_lines_are_those_of_the_percent_style_formatter() -> None:
    fast, slow = TextFormatter(), classic()
    for created in (0.0, 1_800_000_000.25, 1_800_000_000.9, 1_800_000_001.0):
        rec = record("accepted id=%s to=<%s>", "abc", "bob@example.net", created=created)
        assert fast.format(rec) == slow.format(rec)
    pid = record("x").process
    assert fast.format(record("x")) == f"2027-01-15T08:00:00Z smtpq[{pid}] INFO smtpq.queue: x"


def test_text_lines_carry_the_traceback_and_the_stack_as_before() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    for fields in ({"exc_info": info}, {"stack_info": "Stack (most recent call last):\n  x"}):
        fast, slow = record("failed %s", "here"), record("failed %s", "here")
        for rec in (fast, slow):
            for key, value in fields.items():
                setattr(rec, key, value)
        assert TextFormatter().format(fast) == classic().format(slow)
        assert "\n" in TextFormatter().format(fast)


def handler() -> tuple[LineHandler, CountingStream]:
    stream = CountingStream()
    h = LineHandler(stream)
    h.setFormatter(TextFormatter())
    return h, stream


def lines(stream: io.StringIO) -> list[str]:
    return [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]


def test_lines_outside_an_event_loop_are_written_at_once() -> None:
    h, stream = handler()
    h.handle(record("one"))
    assert lines(stream) == ["one"]
    h.handle(record("two"))
    assert (lines(stream), stream.writes) == (["one", "two"], 2)


def test_the_lines_of_one_loop_iteration_leave_in_one_write_in_order() -> None:
    h, stream = handler()

    async def main() -> list[str]:
        for n in range(3):
            h.handle(record("line %d", n))
        seen = lines(stream)  # nothing yet: the iteration is not over
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (lines(stream), stream.writes) == (["line 0", "line 1", "line 2"], 1)
        h.handle(record("line 3"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(main()) == []
    assert (lines(stream)[-1], stream.writes) == ("line 3", 2)


def test_lines_a_stopped_loop_left_pending_come_first() -> None:
    h, stream = handler()
    loop = asyncio.new_event_loop()
    try:

        def log_and_stop() -> None:
            h.handle(record("in the loop"))
            loop.stop()

        loop.call_soon(log_and_stop)
        loop.run_forever()  # stops before the write it scheduled runs
    finally:
        loop.close()
    h.handle(record("after the loop"))
    assert lines(stream) == ["in the loop", "after the loop"]


def test_flush_writes_what_is_pending() -> None:
    h, stream = handler()

    async def main() -> None:
        h.handle(record("pending"))
        h.flush()
        assert lines(stream) == ["pending"]

    asyncio.run(main())
    assert stream.writes == 1


def test_lines_from_other_threads_are_written_at_once() -> None:
    h, stream = handler()

    def in_thread() -> list[str]:
        h.handle(record("thread"))
        return lines(stream)

    async def main() -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(None, in_thread)

    assert asyncio.run(main()) == ["thread"]


def test_configure_logging_writes_to_standard_error(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info")
        logging.getLogger("smtpq.queue").info("accepted id=%s", "x")
        logging.getLogger("smtpq.queue").debug("not shown")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert err.endswith(" INFO smtpq.queue: accepted id=x\n")
    assert "not shown" not in err
