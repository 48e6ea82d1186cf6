"""RedisStorage: one queue shared by any number of Queue processes, on one Redis or a cluster."""

from smtpq.storage.redis.storage import FORMAT_VERSION, RedisStorage

__all__ = ["FORMAT_VERSION", "RedisStorage"]
