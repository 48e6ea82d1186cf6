"""The admin API's client side: how ``smtpq queue ...`` talks to a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

__all__ = ["AdminClient", "AdminUnavailable"]

_READ_SIZE = 1 << 16


class AdminUnavailable(Exception):
    """No daemon answers on the admin socket."""


class AdminError(Exception):
    """The daemon refused the request; the message is its explanation."""


class AdminClient:
    """Requests to the admin API over its Unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AdminUnavailable(str(exc)) from None

    @contextlib.asynccontextmanager
    async def _send(
        self, method: str, path: str, body: Any = None
    ) -> AsyncIterator[asyncio.StreamReader]:
        """The response body's stream, after the status and headers (the writer is kept open
        until the body is read: a dropped StreamWriter closes the connection)."""
        reader, writer = await self._open()
        try:
            yield await self._exchange(reader, writer, method, path, body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        body: Any,
    ) -> asyncio.StreamReader:
        data = json.dumps(body).encode() if body is not None else b""
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: smtpq\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1]) if status_line else 0
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        if status != 200:
            text = await reader.read()
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text.decode("utf-8", "replace").strip() or f"HTTP {status}"
            raise AdminError(message)
        return reader

    async def available(self) -> bool:
        """Whether a daemon answers on the socket."""
        try:
            await self.get("/health")
        except AdminUnavailable:
            return False
        return True

    async def get(self, path: str) -> Any:
        """GET a JSON document."""
        async with self._send("GET", path) as reader:
            return json.loads(await reader.read())

    async def get_text(self, path: str) -> str:
        """GET a text document."""
        async with self._send("GET", path) as reader:
            return (await reader.read()).decode()

    async def lines(self, path: str) -> AsyncIterator[dict[str, Any]]:
        """GET a stream of JSON lines."""
        async for block in self.blocks(path):
            for line in block:
                yield json.loads(line)

    async def blocks(self, path: str) -> AsyncIterator[list[bytes]]:
        """GET a stream of JSON lines, undecoded, as they arrive: the complete lines of each
        block read (without their newlines)."""
        async with self._send("GET", path) as reader:
            rest = b""
            while data := await reader.read(_READ_SIZE):
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                if lines:
                    yield lines
            if rest.strip():
                yield [rest]

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON body, get a JSON document."""
        async with self._send("POST", path, body) as reader:
            return json.loads(await reader.read())
