"""Queue storage backends: the contract and its implementations."""

from smtpq.storage.base import QueueStorage, StoredMessage
from smtpq.storage.dict import DictStorage

__all__ = ["DictStorage", "QueueStorage", "StoredMessage"]
