"""DiskStorage held against DictStorage by the storage state machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from smtpq.storage import DiskStorage, QueueStorage
from tests.contract.state_machine import LEASE, MachineBackend, StorageMachine


class DiskBackend:
    """A queue directory of its own for one run of the machine."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="smtpq-machine-"))

    async def open(self) -> QueueStorage:
        return DiskStorage(self.root / "env", self.root / "meta", lease_timeout=LEASE)

    async def destroy(self) -> None:
        shutil.rmtree(self.root)


async def disk_backend() -> MachineBackend:
    return DiskBackend()


class DiskMachine(StorageMachine):
    """The storage state machine over DiskStorage."""

    backend_factory = disk_backend


TestDiskStorageMachine = DiskMachine.TestCase
