"""aiosmtpd finds hooks by name and ignores a misspelt one (then, for RCPT, accepting every
recipient). These tests hold the edge's hook and override names against aiosmtpd's own code."""

from __future__ import annotations

import inspect
import re

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

from smtpq.edge.server import _EdgeHandler, _EdgeProtocol


def hooks_aiosmtpd_calls() -> set[str]:
    """Every ``handle_X`` that aiosmtpd's SMTP looks up, read from its source."""
    source = inspect.getsource(aiosmtpd.smtp)
    called = set(re.findall(r"_call_handler_hook\(\s*['\"](\w+)['\"]", source))
    looked_up = set(re.findall(r"_handle_hooks\.get\(\s*['\"](\w+)['\"]", source))
    return called | looked_up


def test_every_handler_hook_is_one_aiosmtpd_calls() -> None:
    defined = {name for name in vars(_EdgeHandler) if name.startswith("handle_")}
    assert defined == {"handle_EHLO", "handle_MAIL", "handle_RCPT", "handle_DATA"}
    known = hooks_aiosmtpd_calls()
    assert {"EHLO", "MAIL", "RCPT", "DATA"} <= known
    assert {name.removeprefix("handle_") for name in defined} <= known


def test_ehlo_hook_has_the_current_signature() -> None:
    # aiosmtpd tells the old (4-argument) hook from the new one by its parameter count.
    params = inspect.signature(_EdgeHandler(None).handle_EHLO).parameters  # type: ignore[arg-type]
    assert len(params) == 5


def test_every_protocol_override_overrides_something() -> None:
    overrides = {
        "smtp_MAIL",
        "smtp_RCPT",
        "smtp_DATA",
        "auth_PLAIN",
        "auth_LOGIN",
        "handle_exception",
        "push",
        "connection_made",
        "connection_lost",
        "_timeout_cb",
        "_create_session",
        "_create_envelope",
    }
    for name in overrides:
        assert name in vars(_EdgeProtocol), name
        assert callable(getattr(SMTP, name, None)), f"aiosmtpd's SMTP has no {name}"
    # Anything else defined on the protocol that looks like an aiosmtpd name must be listed.
    aiosmtpd_style = {
        n for n in vars(_EdgeProtocol) if n.startswith(("smtp_", "auth_", "handle_", "_create_"))
    }
    assert aiosmtpd_style <= overrides


def test_what_the_data_reader_uses_is_in_aiosmtpd() -> None:
    # smtp_DATA is replaced whole: the state it shares with aiosmtpd must still be there.
    for name in ("check_helo_needed", "check_auth_needed", "_set_post_data_state", "push"):
        assert callable(getattr(SMTP, name, None)), name
    assert SMTP.line_length_limit == 1001
    assert "self._reader" in inspect.getsource(SMTP._cb_client_connected)
