"""The state machine checked on the model itself: DictStorage against DictStorage.

A cheap guard on the machine: a rule that compares what cannot be compared fails here first.
"""

from __future__ import annotations

from typing import Any

from smtpq.storage import DictStorage, QueueStorage
from tests.contract.state_machine import LEASE, MachineBackend, StorageMachine


class DictBackend:
    """Two dicts that outlive the storage objects opened on them."""

    def __init__(self) -> None:
        self.env_db: dict[str, Any] = {}
        self.meta_db: dict[str, Any] = {}

    async def open(self) -> QueueStorage:
        return DictStorage(self.env_db, self.meta_db, lease_timeout=LEASE)

    async def destroy(self) -> None:
        self.env_db.clear()
        self.meta_db.clear()


async def dict_backend() -> MachineBackend:
    return DictBackend()


class DictMachine(StorageMachine):
    """The storage state machine over DictStorage."""

    backend_factory = dict_backend


TestDictStorageMachine = DictMachine.TestCase
