"""SMTP AUTH credentials: salted, slow password hashes in a plain text file.

The file has one ``user:hash`` per line (``#`` starts a comment line). A hash is written by
:func:`hash_password` (``smtpq passwd``) as ``scrypt$n$r$p$salt$key`` or
``pbkdf2_sha256$iterations$salt$key``, salt and key in base64. No password is ever stored.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["PasswordFile", "hash_password", "verify_password"]

log = logging.getLogger("smtpq.edge")

# scrypt n=2**14, r=8: 16 MiB and some tens of milliseconds per check, as Python's docs suggest.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
# OWASP's 2023 figure for PBKDF2-HMAC-SHA256.
_PBKDF2_ITERATIONS = 600_000
_SALT_BYTES = 16
_KEY_BYTES = 32


#: Password checks running at once, in the whole process: half the cores. A check is some tens
#: of milliseconds of CPU and 16 MiB (scrypt); guessers opening more sessions get in line here,
#: and never more than that share of the machine.
VERIFIERS = max(1, (os.cpu_count() or 2) // 2)


@functools.cache
def _verifiers() -> ThreadPoolExecutor:
    # One pool per process, made on the first AUTH: the CPU it bounds is the process's.
    return ThreadPoolExecutor(VERIFIERS, thread_name_prefix="smtpq-auth")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, scheme: str = "scrypt") -> str:
    """A salted hash of ``password`` for the credentials file (``scrypt`` or ``pbkdf2_sha256``)."""
    salt = secrets.token_bytes(_SALT_BYTES)
    secret = password.encode("utf-8")
    if scheme == "scrypt":
        key = hashlib.scrypt(
            secret, salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_KEY_BYTES
        )
        return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(key)}"
    if scheme == "pbkdf2_sha256":
        key = hashlib.pbkdf2_hmac("sha256", secret, salt, _PBKDF2_ITERATIONS, _KEY_BYTES)
        return f"pbkdf2_sha256${_PBKDF2_ITERATIONS}${_b64(salt)}${_b64(key)}"
    raise ValueError(f"unknown password scheme {scheme!r}")


def verify_password(password: str | bytes, encoded: str) -> bool:
    """Whether ``password`` matches a hash from :func:`hash_password`; False for a bad hash."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    try:
        scheme, *fields = encoded.split("$")
        if scheme == "scrypt":
            n, r, p, salt, key = fields
            expected = base64.b64decode(key, validate=True)
            rounds, block = int(n), int(r)
            got = hashlib.scrypt(
                secret,
                salt=base64.b64decode(salt, validate=True),
                n=rounds,
                r=block,
                p=int(p),
                dklen=len(expected),
                maxmem=129 * block * rounds + (1 << 20),
            )
        elif scheme == "pbkdf2_sha256":
            iterations, salt, key = fields
            expected = base64.b64decode(key, validate=True)
            got = hashlib.pbkdf2_hmac(
                "sha256",
                secret,
                base64.b64decode(salt, validate=True),
                int(iterations),
                len(expected),
            )
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def parse_password_lines(text: str, source: str = "<credentials>") -> dict[str, str]:
    """``user:hash`` lines to a dict; malformed lines are logged and skipped."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # A hash never contains ':', so the user name may (an e-mail address with a port...).
        user, sep, encoded = line.rpartition(":")
        if not sep or not user or "$" not in encoded:
            log.warning("%s:%d: not a user:hash line; ignored", source, number)
            continue
        users[user] = encoded
    return users


class PasswordFile:
    """The credentials file; re-read when it changes, so users are added without a restart.

    :meth:`check` runs the slow hash in one of the process's :data:`VERIFIERS` threads: an AUTH
    never stalls the event loop, and AUTHs in parallel wait their turn.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        # An unknown user is checked against this, so that timing does not tell who exists.
        self._decoy = hash_password(secrets.token_hex(8))

    def _refresh(self) -> dict[str, str]:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._users = parse_password_lines(self.path.read_text("utf-8"), str(self.path))
            self._stamp = stamp
        return self._users

    def _check(self, user: str, password: bytes) -> bool:
        encoded = self._refresh().get(user)
        ok = verify_password(password, encoded or self._decoy)
        return ok and encoded is not None

    async def check(self, user: str, password: bytes) -> bool:
        """Whether ``user`` exists with this password. OSError if the file cannot be read."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_verifiers(), self._check, user, password)
