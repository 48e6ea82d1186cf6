"""For the tests of DiskStorage's modules: a spool in a test's directory, and messages written
on it through a real commit batch (real files, really synced), without an event loop."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from smtpq.envelope import Envelope
from smtpq.storage.base import new_id
from smtpq.storage.disk.batch import BatchWriter, Op, OpKind
from smtpq.storage.disk.meta import Meta
from smtpq.storage.disk.spool import Spool
from smtpq.storage.disk.sync import Flusher

NOW = 1_800_000_000.0


def envelope(n: int = 0, rcpts: int = 2) -> Envelope:
    """A small envelope, different for each ``n``."""
    env = Envelope(f"s{n}@example.org", [f"r{i}@example.com" for i in range(rcpts)])
    env.parse(b"Subject: disk %d\r\n\r\nbody\r\n" % n)
    return env


class DiskFiles:
    """A spool under ``root`` (opened: its directories exist) and a batch writer on it."""

    def __init__(self, root: Path, sync: str = "fsync") -> None:
        self.env, self.meta = root / "env", root / "meta"
        self.tmp, self.corrupt = self.meta / "tmp", self.meta / "corrupt"
        dirs = (self.env, self.meta, self.tmp, self.corrupt)
        self.spool = Spool(*map(str, dirs), durable=sync != "none")
        self.flusher = Flusher(sync, threads=2)
        self.writer = BatchWriter(self.spool, self.flusher)
        self.spool.open()

    def __enter__(self) -> DiskFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.flusher.close()
        self.spool.close()

    def commit(self, *ops: Op) -> tuple[Op, ...]:
        """Carry out one batch of ``ops``."""
        self.writer.commit(list(ops))
        return ops

    def write(self, n: int = 0, timestamp: float = NOW, rcpts: int = 2) -> str:
        """Store message ``n``; its id."""
        data = envelope(n, rcpts).to_bytes()
        [op] = self.commit(Op(OpKind.WRITE, new_id(timestamp), env=data, meta=Meta(timestamp)))
        assert op.error is None
        return op.id

    def update(self, id: str, **fields: Any) -> Op:
        """One update of message ``id`` setting meta ``fields``, committed alone."""

        def change(meta: Meta) -> None:
            for name, value in fields.items():
                setattr(meta, name, value)

        [op] = self.commit(Op(OpKind.UPDATE, id, fn=change))
        return op

    def names(self, path: Path) -> set[str]:
        """The names in a directory."""
        return {p.name for p in path.iterdir()}
