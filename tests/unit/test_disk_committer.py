"""Group commit (GroupCommitter): operations gathered into batches on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpq.errors import MessageGone
from smtpq.storage.base import new_id
from smtpq.storage.disk import committer as committer_module
from smtpq.storage.disk.batch import Op, OpKind
from smtpq.storage.disk.committer import GroupCommitter
from smtpq.storage.disk.meta import Meta
from tests.unit.disk_files import NOW, DiskFiles, envelope


class Recorder:
    """A group committer on real files, and what it passed on of each batch."""

    def __init__(self, disk: DiskFiles) -> None:
        self.batches: list[list[tuple[OpKind, bool]]] = []  # (kind, caller already told)
        self.committer = GroupCommitter(disk.writer, self.committed)

    def committed(self, batch: list[Op]) -> None:
        self.batches.append([(op.kind, op.future is None or op.future.done()) for op in batch])

    async def write(self, n: int = 0) -> str:
        op = Op(OpKind.WRITE, new_id(NOW), env=envelope(n).to_bytes(), meta=Meta(NOW))
        await self.committer.submit(op)
        return op.id


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskFiles]:
    with DiskFiles(tmp_path) as files:
        yield files


async def test_concurrent_operations_share_batches(disk: DiskFiles) -> None:
    rec = Recorder(disk)
    ids = await asyncio.gather(*(rec.write(n) for n in range(20)))
    assert disk.names(disk.env) == {f"{id}.env" for id in ids}
    # All were submitted before the commit task first ran: one batch.
    assert [len(b) for b in rec.batches] == [20]
    assert (rec.committer.batches, rec.committer.batched_ops) == (1, 20)
    # Each batch is passed on before its callers learn the outcome.
    assert not any(told for batch in rec.batches for _, told in batch)
    rec.committer.shutdown()


async def test_errors_reach_their_callers_and_inflight_counts_down(disk: DiskFiles) -> None:
    rec = Recorder(disk)
    id = await rec.write()
    removal = asyncio.ensure_future(rec.committer.submit(Op(OpKind.REMOVE, id)))
    update = Op(OpKind.UPDATE, id, fn=lambda meta: None)
    await asyncio.sleep(0)
    assert rec.committer.inflight == {id: 1}  # the removal, not the update
    with pytest.raises(MessageGone):  # the update comes after the removal, in one batch
        await rec.committer.submit(update)
    await removal
    assert not rec.committer.inflight
    rec.committer.shutdown()


async def test_removals_alone_wait_for_company_and_drain_commits_them(
    disk: DiskFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(committer_module, "REMOVE_LINGER", 60.0)
    rec = Recorder(disk)
    ids = [await rec.write(n) for n in range(3)]
    removals = [asyncio.ensure_future(rec.committer.submit(Op(OpKind.REMOVE, id))) for id in ids]
    await asyncio.sleep(0.05)
    assert not any(r.done() for r in removals)
    await rec.committer.drain()
    await asyncio.gather(*removals)
    assert rec.batches[-1] == [(OpKind.REMOVE, False)] * 3
    assert disk.names(disk.env) == set()
    rec.committer.shutdown()
