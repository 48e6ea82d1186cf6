"""Password hashing and the credentials file."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpq.edge.auth import PasswordFile, hash_password, parse_password_lines, verify_password


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2_sha256"])
def test_hash_and_verify(scheme: str) -> None:
    hashed = hash_password("pässword", scheme=scheme)
    assert hashed.startswith(scheme + "$")
    assert "pässword" not in hashed
    assert verify_password("pässword", hashed)
    assert verify_password("pässword".encode(), hashed)
    assert not verify_password("password", hashed)
    assert hash_password("pässword", scheme=scheme) != hashed  # salted


@pytest.mark.parametrize(
    "bad", ["", "plain", "md5$abc", "scrypt$1$2", "scrypt$x$8$1$AA==$AA==", "pbkdf2_sha256$1$!$!"]
)
def test_malformed_hashes_never_match(bad: str) -> None:
    assert not verify_password("anything", bad)


def test_unknown_scheme_refused() -> None:
    with pytest.raises(ValueError, match="unknown password scheme"):
        hash_password("x", scheme="md5")


def test_parse_lines_skips_comments_and_junk() -> None:
    users = parse_password_lines(
        "# comment\n\nalice:scrypt$1$2$3$s$k\nno hash here\nuser:with:colons:pbkdf2_sha256$1$s$k\n"
    )
    assert users == {"alice": "scrypt$1$2$3$s$k", "user:with:colons": "pbkdf2_sha256$1$s$k"}


async def test_password_file_reloads_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alice:{hash_password('one')}\n")
    passwords = PasswordFile(path)
    assert await passwords.check("alice", b"one")
    assert not await passwords.check("alice", b"two")
    assert not await passwords.check("bob", b"one")
    path.write_text(f"alice:{hash_password('one')}\nbob:{hash_password('two')}\n")
    assert await passwords.check("bob", b"two")
