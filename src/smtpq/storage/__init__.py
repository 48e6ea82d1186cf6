"""Queue storage backends: the contract and its implementations."""

from smtpq.storage.base import QueueStorage, StoredMessage
from smtpq.storage.dict import DictStorage
from smtpq.storage.disk import DiskStorage
from smtpq.storage.journal import JournalStorage
from smtpq.storage.redis import RedisStorage

__all__ = [
    "DictStorage",
    "DiskStorage",
    "JournalStorage",
    "QueueStorage",
    "RedisStorage",
    "StoredMessage",
]
