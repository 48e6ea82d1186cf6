"""JournalStorage held against DictStorage by the storage state machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from smtpq.storage import JournalStorage, QueueStorage
from tests.contract.state_machine import LEASE, MachineBackend, StorageMachine


class JournalBackend:
    """A queue directory of its own for one run of the machine."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="smtpq-machine-"))

    async def open(self) -> QueueStorage:
        # Small segments: the machine's runs roll, delete and compact them too.
        return JournalStorage(self.root, lease_timeout=LEASE, segment_size=4096)

    async def destroy(self) -> None:
        shutil.rmtree(self.root)


async def journal_backend() -> MachineBackend:
    return JournalBackend()


class JournalMachine(StorageMachine):
    """The storage state machine over JournalStorage."""

    backend_factory = journal_backend


TestJournalStorageMachine = JournalMachine.TestCase
