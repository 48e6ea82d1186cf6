"""The queue: pure outcome and retry rules, and the asyncio driver that carries them out."""

from smtpq.queue.driver import Queue, QueueEvent

__all__ = ["Queue", "QueueEvent"]
