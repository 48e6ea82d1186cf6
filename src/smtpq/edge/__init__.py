"""The SMTP edge: accepts mail for the queue, answering 250 only once it is stored."""

from smtpq.edge.access import RelayPolicy
from smtpq.edge.auth import PasswordFile, hash_password, verify_password
from smtpq.edge.server import EdgeConfig, Enqueuer, SmtpEdge

__all__ = [
    "EdgeConfig",
    "Enqueuer",
    "PasswordFile",
    "RelayPolicy",
    "SmtpEdge",
    "hash_password",
    "verify_password",
]
