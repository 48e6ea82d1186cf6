"""smtpq's server from real clients over loopback: smtplib, aiosmtplib, Postfix's smtp-source,
and raw pipelined and BDAT sessions; plain, STARTTLS and AUTH; on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtpq.edge import hash_password
from tests.integration.smtp.conftest import TlsFiles
from tests.integration.smtp.edge_peers import (
    RUNNERS,
    RawClient,
    Runner,
    postfix_tool,
    run_tool,
    serving,
    stored,
)

BODY = b"Subject: interop\r\n\r\n.leading dot\r\nline\r\n"


@pytest.fixture(params=list(RUNNERS))
def run(request: pytest.FixtureRequest) -> Runner:
    return RUNNERS[request.param]


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    path = tmp_path / "passwords"
    path.write_text(f"alice:{hash_password('wonderland', scheme='pbkdf2_sha256')}\n")
    return path


def tls_config(tls_files: TlsFiles, credentials: Path, **more: Any) -> dict[str, Any]:
    return {
        "tls_cert": str(tls_files.cert),
        "tls_key": str(tls_files.key),
        "credentials_file": str(credentials),
        "trusted_networks": (),
        **more,
    }


# -- smtplib ----------------------------------------------------------------------------------


def test_smtplib_plain_several_messages(run: Runner) -> None:
    async def scenario() -> None:
        async with serving() as (edge, store):

            def send() -> None:
                with smtplib.SMTP("127.0.0.1", edge.port, timeout=10) as s:
                    for i in range(3):
                        s.sendmail("a@example.org", [f"r{i}@example.net"], BODY)

            await asyncio.to_thread(send)
            envs = await stored(store)
        assert [e.recipients for e in envs] == [[f"r{i}@example.net"] for i in range(3)]
        assert all(b"".join(e.flatten()) == BODY for e in envs)

    run(scenario())


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_starttls_and_auth(
    run: Runner,
    mechanism: str,
    tls_files: TlsFiles,
    credentials: Path,
    client_tls: ssl.SSLContext,
) -> None:
    async def scenario() -> None:
        async with serving(**tls_config(tls_files, credentials)) as (edge, store):

            def send() -> None:
                with smtplib.SMTP("127.0.0.1", edge.port, timeout=10) as s:
                    s.starttls(context=client_tls)
                    s.ehlo()
                    auth = s.auth_plain if mechanism == "PLAIN" else s.auth_login
                    s.user, s.password = "alice", "wonderland"
                    code, _ = s.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")
                    assert code == 235
                    s.sendmail("alice@example.org", ["x@elsewhere.example"], BODY)

            await asyncio.to_thread(send)
            [env] = await stored(store)
        assert (env.client["protocol"], env.client["auth"]) == ("ESMTPSA", "alice")
        assert b"".join(env.flatten()) == BODY

    run(scenario())


# -- aiosmtplib -------------------------------------------------------------------------------


def test_aiosmtplib_plain(run: Runner) -> None:
    async def scenario() -> None:
        async with serving() as (edge, store):
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=edge.port, start_tls=False)
            async with client:
                for i in range(2):
                    errors, reply = await client.sendmail("a@x.example", [f"b{i}@y.example"], BODY)
                    assert errors == {}
                    assert reply.startswith("2.6.0 ")
            assert len(await stored(store)) == 2

    run(scenario())


def test_aiosmtplib_starttls_and_auth(
    run: Runner, tls_files: TlsFiles, credentials: Path, client_tls: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        async with serving(**tls_config(tls_files, credentials)) as (edge, store):
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=edge.port, start_tls=True, tls_context=client_tls
            )
            async with client:
                await client.ehlo()  # again, over TLS
                assert client.supports_extension("auth")
                await client.login("alice", "wonderland")
                await client.sendmail("alice@x.example", ["b@y.example"], BODY)
            [env] = await stored(store)
        assert env.client["protocol"] == "ESMTPSA"

    run(scenario())


def test_aiosmtplib_implicit_tls(
    run: Runner, tls_files: TlsFiles, credentials: Path, client_tls: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        config = tls_config(tls_files, credentials, implicit_tls=True)
        async with serving(**config) as (edge, store):
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=edge.port, use_tls=True, tls_context=client_tls
            )
            async with client:
                assert not client.supports_extension("starttls")
                await client.login("alice", "wonderland")
                await client.sendmail("alice@x.example", ["b@y.example"], BODY)
            [env] = await stored(store)
        assert (env.client["protocol"], env.client["auth"]) == ("ESMTPSA", "alice")

    run(scenario())


# -- Postfix's smtp-source --------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True], ids=["connection-per-message", "one-session"])
def test_smtp_source(run: Runner, reuse: bool) -> None:
    tool = postfix_tool("smtp-source")

    async def scenario() -> None:
        async with serving() as (edge, store):
            argv = [tool, "-s", "2", "-m", "6", "-l", "2048", "-f", "a@example.org"]
            argv += ["-t", "b@example.net", "-S", "from smtp-source"]
            done = await run_tool(*argv, *(["-d"] if reuse else []), f"127.0.0.1:{edge.port}")
            assert done.returncode == 0, done.stderr
            envs = await stored(store)
        assert len(envs) == 6
        assert all(e.headers["Subject"] == "from smtp-source" for e in envs)
        assert all(len(e.body) >= 2048 for e in envs)

    run(scenario())


# -- raw sessions: pipelining (RFC 2920) and BDAT (RFC 3030) ----------------------------------


def test_pipelined_session(run: Runner) -> None:
    async def scenario() -> None:
        async with serving() as (edge, store):
            client = await RawClient.connect(edge.port)
            await client.send(
                b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                b"RCPT TO:<bad address>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
            )
            replies = await client.replies(6)
            assert [r[:3] for r in replies] == ["250", "250", "250", "501", "250", "354"]
            await client.send(BODY.replace(b"\r\n.", b"\r\n..") + b".\r\nNOOP\r\nQUIT\r\n")
            assert [r[:5] for r in await client.replies(3)] == ["250 2", "250 2", "221 2"]
            await client.close()
            [env] = await stored(store)
        assert env.recipients == ["b@example.net", "c@example.net"]
        assert b"".join(env.flatten()) == BODY

    run(scenario())


def test_bdat_session(run: Runner) -> None:
    async def scenario() -> None:
        async with serving() as (edge, store):
            client = await RawClient.connect(edge.port)
            await client.send(b"EHLO c.example\r\n")
            assert (await client.replies(1))[0] == "250 CHUNKING"
            head, tail = BODY[:10], BODY[10:]
            await client.send(
                b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                + b"BDAT %d\r\n" % len(head)
                + head
                + b"BDAT %d LAST\r\n" % len(tail)
                + tail
            )
            replies = await client.replies(4)
            assert replies[2] == f"250 2.0.0 Ok: {len(head)} bytes"
            assert replies[3].startswith("250 2.6.0 Message accepted")
            # Pipelined with the next transaction, and the first chunk empty.
            await client.send(
                b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.net>\r\nBDAT 0\r\n"
                b"BDAT 4 LAST\r\nx\r\n.QUIT\r\n"
            )
            assert [r[:3] for r in await client.replies(5)] == ["250"] * 4 + ["221"]
            await client.close()
            envs = await stored(store)
        assert [b"".join(e.flatten()) for e in envs] == [BODY, b"x\r\n."]

    run(scenario())
