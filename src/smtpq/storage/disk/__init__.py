"""DiskStorage: the durable default — two small files per message, synced, renamed into place.

Each message is an ``<id>.env`` (the envelope, written once) and an ``<id>.meta`` (next attempt,
attempts, delivered recipients, held, last reply), in two directories of one filesystem. A
message exists iff both of its files exist: a write makes both durable in a scratch directory,
renames the ``.env`` then the ``.meta`` into place, and the directories are fsynced before it
returns; a removal takes the ``.meta`` then the ``.env`` away; a meta update swaps a new file in
atomically. A crash in between leaves an *orphan* that :meth:`DiskStorage.load` resolves by
that rule. Ids are those of :func:`~smtpq.storage.base.new_id` (32 lowercase hex digits,
time-ordered); only that form is accepted from callers (anything else is gone:
:class:`~smtpq.errors.MessageGone`), so an id typed into an admin tool cannot name a path outside
the queue directories.

Every blocking call runs in worker threads, never on the event loop. One process owns a queue
directory: its schedule (:class:`~smtpq.storage.schedule.LocalSchedule`) lives in memory.

The package, by concern:

* :mod:`~smtpq.storage.disk.meta` — the meta file format and its codec (pure);
* :mod:`~smtpq.storage.disk.libc` — syncfs and renameat2 through ctypes;
* :mod:`~smtpq.storage.disk.sync` — :class:`SyncMode` and the first flush of a batch;
* :mod:`~smtpq.storage.disk.spool` — the directories, scratch files, inode reuse, quarantine;
* :mod:`~smtpq.storage.disk.batch` — one commit batch and its flush waves (commit thread);
* :mod:`~smtpq.storage.disk.committer` — group commit: batches gathered on the event loop;
* :mod:`~smtpq.storage.disk.scan` — the load scan and the recovery of what a crash left;
* :mod:`~smtpq.storage.disk.reader` — whole entries and listing records;
* :mod:`~smtpq.storage.disk.storage` — :class:`DiskStorage`, the contract over all of them.
"""

from smtpq.storage.disk.storage import DiskStorage
from smtpq.storage.disk.sync import SyncMode

__all__ = ["DiskStorage", "SyncMode"]
