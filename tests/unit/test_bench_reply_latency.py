"""bench/reply_latency.py's own parts: the message it sends and the figures it takes (the runs
through ``smtpq serve`` are the benchmark's, not the tests')."""

from __future__ import annotations

import email
import email.policy

import pytest
import reply_latency


def test_the_message_is_about_the_size_asked_in_short_lines() -> None:
    body = reply_latency.message(2048)
    assert 1900 <= len(body) <= 2048
    lines = body.split(b"\r\n")
    assert lines[-1] == b""  # ends with CRLF
    assert max(len(line) for line in lines) <= 78
    parsed = email.message_from_bytes(body, policy=email.policy.SMTP)
    assert parsed["Subject"] == "latency"
    assert b"\n" not in body.replace(b"\r\n", b"")  # no bare LF


def test_a_tiny_size_still_gives_a_body_line() -> None:
    assert reply_latency.message(10).endswith(b"\r\n\r\n" + b"x" * 78 + b"\r\n")


def test_median_and_90th_percentile_by_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 11)]  # 1..10, shuffled order does not matter
    assert reply_latency.quantiles(list(reversed(samples))) == (5.5, 9.0)
    assert reply_latency.quantiles([3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError, match="no samples"):
        reply_latency.quantiles([])
