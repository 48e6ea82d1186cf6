"""bench/edge_bench.py's own logic: its three peers count what they took, and the summary.

The peers are served in this process over loopback and fed by smtplib; the timed runs
(child processes under smtp-source) are the benchmark's, not the tests'.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from typing import Any

import edge_bench
import pytest
import uvloop

import e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((e2e.HOST, 0))
        return int(sock.getsockname()[1])


def send(port: int, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    """One session: each body as a message to e2e.RECIPIENT (a domain the server does not
    serve: relaying, which loopback may do); the replies to DATA's end."""
    with smtplib.SMTP(e2e.HOST, port, timeout=30) as client:
        client.ehlo("client.bench.example")
        replies = []
        for body in bodies:
            client.mail(e2e.SENDER)
            client.rcpt(e2e.RECIPIENT)
            replies.append(client.data(body))
        return replies


async def serve_three(peer: str) -> tuple[list[int], int]:
    """Serve ``peer``, send it three messages in one session; the replies and its count."""
    port = free_port()
    listening, stop = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(edge_bench.serve(peer, port, listening.set, stop))
    await asyncio.wait_for(listening.wait(), 30)
    bodies = [
        b"Subject: one\r\n\r\nhello\r\n",
        b"Subject: two\r\n\r\n.\r\n..\r\nlast\r\n",  # lone dots, stuffed by smtplib: not the end
        b"Subject: three\r\n\r\n" + (b"x" * 62 + b"\r\n") * 32,  # 2 KB
    ]
    replies = await asyncio.to_thread(send, port, bodies)
    stop.set()
    return [code for code, _ in replies], await asyncio.wait_for(serving, 30)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("peer", edge_bench.PEERS)
def test_each_peer_answers_250_and_counts_every_message(peer: str, loop: str) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(serve_three(peer)) == ([250, 250, 250], 3)


def run(peer: str, sessions: int, rate: float, cpu: float, complete: bool = True) -> dict[str, Any]:
    return {
        "peer": peer,
        "sessions": sessions,
        "msgs_per_s": rate,
        "cpu_ms_per_msg": cpu,
        "complete": complete,
    }


def test_the_summary_takes_medians_of_complete_runs_and_smtpq_over_each_peer() -> None:
    runs = [
        run("smtpq", 10, 900.0, 0.3),
        run("smtpq", 10, 1000.0, 0.2),
        run("smtpq", 10, 1100.0, 0.1),
        run("smtpq", 10, 5.0, 9.0, complete=False),  # never in a median
        run("aiosmtpd", 10, 200.0, 0.5),
        run("raw", 10, 2000.0, 0.05),
        run("smtpq", 50, 800.0, 0.4),
    ]
    summary = edge_bench.summarize(runs)
    assert list(summary) == [10, 50]
    assert summary[10]["smtpq"] == {"msgs_per_s": 1000.0, "cpu_ms_per_msg": 0.2}
    ratios = edge_bench.ratios(summary[10])
    assert ratios["aiosmtpd"] == pytest.approx({"msgs_per_s": 5.0, "cpu_ms_per_msg": 0.4})
    assert ratios["raw"] == pytest.approx({"msgs_per_s": 0.5, "cpu_ms_per_msg": 4.0})
    assert edge_bench.ratios(summary[50]) == {}  # smtpq alone: nothing to compare with
    assert edge_bench.ratios({"raw": summary[10]["raw"]}) == {}


def test_the_load_is_smtp_source_with_a_new_connection_per_message() -> None:
    args = edge_bench.parse_args(["-n", "500", "--sessions", "1,10", "--peers", "smtpq,raw"])
    assert (args.n, args.sessions, args.peers) == (500, [1, 10], ("smtpq", "raw"))
    command = edge_bench.source_command(10, args.n, args.size, args.port)
    assert command[0] == e2e.SMTP_SOURCE
    assert "-d" not in command  # -d would keep each session's connection for many messages
    value = {option: command[command.index(option) + 1] for option in ("-s", "-m", "-l")}
    assert value == {"-s": "10", "-m": "500", "-l": "2048"}
    assert command[-1] == f"127.0.0.1:{args.port}"
    with pytest.raises(SystemExit):
        edge_bench.parse_args(["--peers", "smtpq,postfix"])
