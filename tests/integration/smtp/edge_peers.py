"""Helpers for the edge's interoperability tests: an edge on a real queue, loop runners, the
Postfix tools, and a raw SMTP client for what no library sends (pipelining, BDAT)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from smtpq import DictStorage, Envelope, Queue
from smtpq.edge import EdgeConfig, SmtpEdge

#: Runs a test's coroutine on a loop: the default asyncio loop, and uvloop (as the daemon runs).
Runner = Callable[[Coroutine[Any, Any, None]], None]
RUNNERS: dict[str, Runner] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@asynccontextmanager
async def serving(
    store: DictStorage | None = None, **config: Any
) -> AsyncIterator[tuple[SmtpEdge, DictStorage]]:
    """An edge on port 0 in front of a Queue on ``store`` (a new DictStorage by default)."""
    store = store if store is not None else DictStorage()
    config.setdefault("port", 0)
    config.setdefault("hostname", "mx.smtpq.test")
    config.setdefault("reverse_lookup", False)
    async with Queue(store) as queue, SmtpEdge(queue, EdgeConfig(**config)) as edge:
        yield edge, store


async def stored(store: DictStorage) -> list[Envelope]:
    """The envelopes in the storage, oldest first."""
    return [(await store.get(id))[0] for _, id in sorted(await store.load())]


def postfix_tool(name: str) -> str:
    """The path of Postfix's ``smtp-source`` / ``smtp-sink``; missing fails in CI."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}") if Path(p).exists()),
        None,
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"Postfix's {name} is needed in CI")
        pytest.skip(f"Postfix's {name} is not installed")
    return found


async def run_tool(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command to its end (off the loop), output captured."""
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=60)


class RawClient:
    """An SMTP client that writes what it is told, when it is told, and reads replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        assert (await client.replies(1))[0].startswith("220 ")
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def replies(self, count: int) -> list[str]:
        """The next ``count`` replies, each as its last line."""
        out: list[str] = []
        while len(out) < count:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                raise ConnectionError(f"closed after {out}")
            if line[3:4] != "-":
                out.append(line.rstrip("\r\n"))
        return out

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class GatedStorage(DictStorage):
    """A DictStorage whose writes wait for a gate (to see what happens meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def write(self, envelope: Envelope, timestamp: float, *, claimed: bool = False) -> str:
        self.started.set()
        await self.gate.wait()
        return await super().write(envelope, timestamp, claimed=claimed)


def make_certificate(where: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 with common name ``name``, and its key."""
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
