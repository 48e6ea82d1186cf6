"""JournalStorage: a durable local queue in append-only segment files.

One directory per queue shard, holding ``00000001.log``, ``00000002.log``, ... and a ``corrupt``
directory. Every change — a new message, a new state, a removal — is a checksummed record
appended to the newest segment (:mod:`~smtpq.storage.journal.records`); the changes that
arrive while an append runs go together in the next one, and an append is one ``write`` and
one ``fdatasync`` (:mod:`~smtpq.storage.journal.segments`). So a message is durable before
``250`` after a single flush, where :class:`~smtpq.storage.DiskStorage`'s two files and their
renames take two, and no file is created, renamed or unlinked per message.

The state of every message and the place of its envelope are kept in memory
(:mod:`~smtpq.storage.journal.index`), rebuilt at start by replaying the segments
(:mod:`~smtpq.storage.journal.recovery`), which sets damaged records aside and cuts off the
torn tail of an interrupted append. Old segments are deleted once they hold no live message,
oldest first; the live messages of a mostly dead oldest segment — or of the oldest at all when
the journal holds more than twice its live data — are appended again, so that the journal
stays within about twice the queue's size plus two segments.

Crash safety: a write or a state change is acknowledged only after the flush of the append that
carries it; a
record replayed must pass its CRC and its shape; a removal can never be lost behind a later
segment's deletion, since segments go oldest first, each deletion durable before the next.
A removal waits up to 20 ms for a write to share an append with, and is never flushed on its
own (it rides in the next flush, or the kernel's write-back): a process crash never undoes it,
a power cut may deliver the message again, never lose it.
"""

from smtpq.storage.journal.storage import JournalStorage

__all__ = ["JournalStorage"]
