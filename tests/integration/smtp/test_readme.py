"""The README's library example, run as a program against a real SMTP server on loopback.

The example is a complete program whose only site-specific values are three names at its top:
the smarthost, its port and the spool directory. A reader must change exactly those, so the test
changes exactly those (to a local sink and a temporary directory) and runs everything else as
written; the names must each be assigned once, so the README cannot drift from the test.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.smtp.sink import Sink

README = Path(__file__).resolve().parents[3] / "README.md"


def library_example() -> str:
    """The python block of the README's "As a library" section."""
    section = README.read_text().split("## As a library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README lost its library example"
    return match.group(1)


def with_settings(program: str, **values: object) -> str:
    """``program`` with each ``NAME = ...`` line of ``values`` given its new value."""
    for name, value in values.items():
        pattern = re.compile(rf"^{name} = .*$", re.M)
        assert len(pattern.findall(program)) == 1, f"{name} is not assigned once in the README"
        program = pattern.sub(f"{name} = {value!r}", program)
    return program


async def test_the_library_example_delivers(sink: Sink, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    program = with_settings(library_example(), SMARTHOST="127.0.0.1", PORT=sink.port,
                            SPOOL=str(spool))  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", program],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    queue_id = re.fullmatch(r"queued as ([0-9a-f]{32})\n", done.stdout)
    assert queue_id is not None, done.stdout
    [received] = sink.received
    assert (received.sender, received.recipients) == ("alice@example.org", ["bob@example.net"])
    assert received.data.endswith(b"Subject: hi\r\n\r\nHello.\r\n")
    # Delivered, so removed: the spool holds no message.
    assert not [p for p in (spool / "meta").iterdir() if p.is_file()]
    assert not list((spool / "env").iterdir())
