"""The ``smtpq`` command: ``serve`` the MTA, inspect and steer its ``queue``, hash a ``passwd``.

Exit codes: 0 success, 1 an operation failed, 2 a usage or configuration error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlencode

import click

from smtpq.daemon.config import (
    Config,
    ConfigError,
    ConfigSource,
    default_config_path,
    load_config,
)
from smtpq.daemon.errors import StartupError

if TYPE_CHECKING:  # the server's modules are imported by the commands that need them
    from smtpq.daemon.server import Shard

__all__ = ["main"]

T = TypeVar("T")


def _fail(exc: StartupError) -> NoReturn:
    """A start-up error's one line on standard error, and exit code 2."""
    kind = "configuration error: " if isinstance(exc, ConfigError) else ""
    click.echo(f"smtpq: {kind}{exc}", err=True)
    sys.exit(2)


class QueueUnavailable(Exception):
    """The command cannot reach the queue it was pointed at; the message says why."""


def _load(config_path: str | None, **overrides: Any) -> Config:
    """The configuration of ``-c FILE``, else of the default path (``$SMTPQ_CONFIG`` or
    /etc/smtpq/smtpq.toml), else the defaults: ``serve`` and ``queue`` find the same queue."""
    try:
        return load_config(_config_path(config_path), **overrides)
    except StartupError as exc:
        _fail(exc)


def _config_path(given: str | None) -> str | None:
    """``-c FILE``, else the default path (``$SMTPQ_CONFIG`` or /etc/smtpq/smtpq.toml) if any."""
    path = given or default_config_path()
    return str(path) if path is not None else None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except StartupError as exc:
        _fail(exc)
    except QueueUnavailable as exc:
        click.echo(f"smtpq: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smtpq")
def main() -> None:
    """smtpq: an SMTP queue service — accept, store durably, deliver, retry, bounce."""


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(), help="TOML configuration file.")
@click.option("--listen", multiple=True, help="Address to listen on, host:port (repeatable).")
@click.option("--queue-dir", help="Directory of a disk or journal queue (storage.path).")
@click.option(
    "--storage", "storage_type", type=click.Choice(["disk", "journal", "redis", "memory"])
)
@click.option("--redis-url", help="Redis URL for storage = redis.")
@click.option("--smarthost", help="Relay all mail through host[:port] instead of MX look-ups.")
@click.option("--hostname", help="Our host name (greeting, Received, DSNs).")
@click.option("--workers", type=int, help="Worker processes (default: one per CPU core).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(
    config_path: str | None,
    listen: tuple[str, ...],
    queue_dir: str | None,
    storage_type: str | None,
    redis_url: str | None,
    smarthost: str | None,
    hostname: str | None,
    workers: int | None,
    log_level: str | None,
) -> None:
    """Run the MTA: SMTP edge, durable queue and relay, until SIGTERM or SIGINT.

    SIGHUP reads the configuration again (the file and these options) and applies what can
    change while running. A start-up error is one line on standard error and exit code 2.
    """
    from smtpq.daemon.config import parse_hostport
    from smtpq.daemon.supervisor import serve_forever

    overrides: dict[str, Any] = {
        "edge.listen": list(listen) or None,
        "storage.path": queue_dir,
        "storage.type": storage_type,
        "storage.url": redis_url,
        "hostname": hostname,
        "workers": workers,
        "log_level": log_level,
    }
    if smarthost:
        try:
            host, port = parse_hostport(smarthost, 25)
        except ConfigError as exc:
            _fail(exc)
        overrides.update({"relay.type": "smarthost", "relay.host": host, "relay.port": port})
    source = ConfigSource(
        _config_path(config_path), {k: v for k, v in overrides.items() if v is not None}
    )
    try:
        config = source.load()
    except StartupError as exc:
        _fail(exc)
    sys.exit(serve_forever(config, source))


# -- config --------------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Check the configuration, or show it with every default."""


_config_file = click.option(
    "-c", "--config", "config_path", type=click.Path(), help="TOML configuration file."
)


@config_group.command("check")
@_config_file
def config_check(config_path: str | None) -> None:
    """Validate the configuration: exit 0, or 2 with the error on one line."""
    _load(config_path)
    click.echo(f"smtpq: configuration {_config_path(config_path) or '(the defaults)'} is valid")


@config_group.command("show")
@_config_file
@click.option("--hide-secrets", is_flag=True, help="Leave passwords and tokens out.")
def config_show(config_path: str | None, hide_secrets: bool) -> None:
    """Print the effective configuration, every default included, as TOML for serve -c."""
    from smtpq.daemon.render import render_config

    click.echo(render_config(_load(config_path), secrets=not hide_secrets), nl=False)


@main.command()
@click.argument("user")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def passwd(user: str, password_stdin: bool) -> None:
    """Print a credentials-file line (user:hash) for SMTP AUTH."""
    from smtpq.edge.auth import hash_password

    if ":" in user or not user:
        click.echo("smtpq: a user name must be non-empty and contain no ':'", err=True)
        sys.exit(2)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            click.echo("smtpq: the passwords differ", err=True)
            sys.exit(1)
    if not password:
        click.echo("smtpq: empty password", err=True)
        sys.exit(2)
    click.echo(f"{user}:{hash_password(password)}")


# -- queue ---------------------------------------------------------------------------------------


class QueueAccess:
    """How ``smtpq queue`` reaches each queue: through the daemon, or the storage itself.

    A running daemon answers on each queue's admin socket (a shard's, or the configured one),
    so that its schedule sees every change at once and its log records the action and who
    asked. Where none answers, the command opens the stored queue itself: the changes are
    stored, so the next start honours them, and the command logs them on standard error. It
    never creates a queue: a disk queue directory without shards is no queue.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def shards(self) -> list[Shard]:
        """The queues to visit: for disk storage, the shard directories that exist."""
        from smtpq.daemon.server import shards

        found = shards(self.config)
        if not self.config.storage.type.local:
            return found
        present = [s for s in found if s.path is not None and s.path.is_dir()]
        if not present:
            raise QueueUnavailable(
                f"no queue in {self.config.storage.path}: no daemon has stored mail there"
                " (give the daemon's -c FILE or --queue-dir)"
            )
        return present

    async def each(
        self,
        online: Callable[[Any], Coroutine[Any, Any, T]],
        offline: Callable[[Any], Coroutine[Any, Any, T]],
        *,
        changes: bool = True,
    ) -> list[T]:
        """Run ``online(client)`` or ``offline(queue)`` on every queue of the daemon.

        ``changes=False`` (a listing) reads a stored queue without taking its lock, so that it
        also works beside a daemon whose admin socket does not answer.
        """
        from smtpq.daemon.client import AdminClient
        from smtpq.daemon.server import open_offline_queue

        results: list[T] = []
        for shard in self.shards():
            client = AdminClient(shard.admin_socket)
            try:
                running = await client.available()
            except OSError as exc:
                raise QueueUnavailable(
                    f"cannot reach the daemon on {shard.admin_socket}: {exc.strerror or exc}"
                ) from None
            if running:
                results.append(await online(client))
            elif self.config.storage.type == "memory":
                raise QueueUnavailable(
                    f"memory storage: no daemon answers on {shard.admin_socket}, so no queue exists"
                )
            else:
                async with open_offline_queue(self.config, shard, changes=changes) as q:
                    results.append(await offline(q))
        return results


def _log_offline_actions() -> None:
    """Without a daemon the command is the log: its actions' lines go to standard error."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("smtpq: %(message)s"))
    root = logging.getLogger("smtpq")
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("smtpq.queue", "smtpq.admin"):
        logging.getLogger(name).setLevel(logging.INFO)


def _queue_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-c", "--config", "config_path", type=click.Path(), help="TOML file.")(f)
    f = click.option("--queue-dir", help="Directory of the disk queue.")(f)
    return f


def _config(config_path: str | None, queue_dir: str | None) -> Config:
    return _load(config_path, **{"storage.path": queue_dir})


@main.group()
def queue() -> None:
    """Inspect and steer the queue (through the daemon when it runs).

    The queue is the one of -c FILE, else of $SMTPQ_CONFIG, else of /etc/smtpq/smtpq.toml when
    it exists, else of the defaults (./smtpq-queue): the same rule as `smtpq serve`'s.
    Without a daemon the changes are made to the stored queue and honoured at its next start.
    """


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--sender-domain", help="Only messages from this domain.")(f)
    f = click.option("--domain", "recipient_domain", help="Only messages to this domain.")(f)
    f = click.option("--min-age", help="Only messages at least this old (90s, 15m, 2h, 3d).")(f)
    f = click.option("--max-age", help="Only messages at most this old.")(f)
    f = click.option("--state", type=click.Choice(["active", "deferred", "held"]))(f)
    return f


def _filter_params(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v not in (None, "", ())}


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@queue.command("list")
@_queue_options
@_filters
@click.option(
    "--json", "as_json", is_flag=True,
    help="One JSON object per line (JSON Lines); an empty queue prints nothing.",
)  # fmt: skip
@click.option("--limit", type=int, help="At most this many messages.")
def list_(config_path: str | None, queue_dir: str | None, as_json: bool, limit: int | None,
          **filters: Any) -> None:  # fmt: skip
    """List queued messages, oldest first (like mailq).

    Ends with the total, as mailq does: "-- 3 Kbytes in 2 messages", or "Mail queue is empty".
    """
    from smtpq.daemon import admin, ops

    params = _filter_params(**filters)
    config = _config(config_path, queue_dir)

    async def online(client: Any) -> tuple[int, int]:
        query = urlencode({**params, **({"limit": limit} if limit is not None else {})})
        if as_json:  # the daemon's lines as they are
            return await _print_json_lines(client.blocks(f"/queue?{query}")), 0
        return await _print_messages(client.lines(f"/queue?{query}"), as_json)

    async def offline(q: Any) -> tuple[int, int]:
        selector = admin.selector_from(params)
        stream = ops.iter_messages(q.store, q.clock.time(), selector)
        return await _print_messages(admin.limited(stream, limit), as_json)

    totals = _run(QueueAccess(config).each(online, offline, changes=False))
    if not as_json:
        click.echo(_summary(sum(n for n, _ in totals), sum(size for _, size in totals)))


def _summary(count: int, size: int) -> str:
    """mailq's last line: the size in Kbytes (rounded up) and the number of messages."""
    if not count:
        return "Mail queue is empty"
    return f"-- {math.ceil(size / 1024)} Kbytes in {count} message{'s' if count != 1 else ''}"


async def _print_messages(stream: AsyncIterator[dict[str, Any]], as_json: bool) -> tuple[int, int]:
    """Print a listing; the number of messages and their total size."""
    # Written to sys.stdout, buffered as it is (by line on a terminal, in blocks into a pipe or
    # a file), rather than echoed and flushed line by line: a million messages list in seconds.
    out = sys.stdout
    count = size = 0
    async for m in stream:
        count += 1
        size += m["size"]
        if as_json:
            out.write(json.dumps(m) + "\n")
            continue
        flag = {"held": "!", "active": "*"}.get(m["state"], " ")
        lines = [
            f"{m['id']}{flag} {m['size']:>8} {_when(m['arrival'])}  <{m['sender']}>"
            f"  attempts={m['attempts']} next={_when(m['next_attempt'])}"
        ]
        if m["last_reply"]:
            lines.append(f"    ({m['last_reply']})")
        lines.extend(f"    <{rcpt}>" for rcpt in m["recipients"])
        out.write("\n".join(lines) + "\n")
    out.flush()
    return count, size


async def _print_json_lines(blocks: AsyncIterator[list[bytes]]) -> int:
    out = sys.stdout
    count = 0
    async for block in blocks:
        count += len(block)
        out.write(b"\n".join(block).decode() + "\n")
    out.flush()
    return count


@queue.command()
@_queue_options
@click.argument("id")
@click.option("--body", is_flag=True, help="Also print the message body.")
@click.option("--json", "as_json", is_flag=True)
def show(config_path: str | None, queue_dir: str | None, id: str, body: bool,
         as_json: bool) -> None:  # fmt: skip
    """Show one message: envelope, status per recipient, headers."""
    from smtpq.daemon import admin
    from smtpq.daemon.client import AdminError

    config = _config(config_path, queue_dir)

    async def online(client: Any) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await client.get(f"/queue/{id}?body={int(body)}")
        except AdminError:
            return None
        return result

    async def offline(q: Any) -> dict[str, Any] | None:
        try:
            return await admin.describe_message(q, id, body)
        except KeyError:
            return None

    answers = _run(QueueAccess(config).each(online, offline, changes=False))
    found = [i for i in answers if i is not None]
    if not found:
        raise click.ClickException(f"no message {id!r} in the queue")
    info = found[0]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"id:           {info['id']}  ({info['state']})")
    click.echo(f"arrival:      {_when(info['arrival'])}")
    click.echo(f"sender:       <{info['sender']}>")
    click.echo(f"size:         {info['size']}")
    click.echo(f"attempts:     {info['attempts']}")
    click.echo(f"next attempt: {_when(info['next_attempt'])}")
    click.echo(f"last reply:   {info['last_reply'] or '-'}")
    client = info.get("client") or {}
    click.echo(f"client:       {client.get('name') or '-'} [{client.get('ip') or '-'}]")
    for r in info["recipient_status"]:
        click.echo(f"recipient:    <{r['recipient']}> {r['status']}")
    click.echo("")
    click.echo(info["headers"].rstrip("\r\n"))
    if body:
        click.echo("")
        click.echo(info["body"])


def _action_command(name: str, doc: str, confirm: bool = False) -> None:
    @queue.command(name, help=doc)
    @_queue_options
    @click.argument("ids", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Every message in the queue.")
    @_filters
    @click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
    def command(config_path: str | None, queue_dir: str | None, ids: tuple[str, ...],
                all_: bool, yes: bool, **filters: Any) -> None:  # fmt: skip
        from smtpq.daemon import admin
        from smtpq.daemon.client import AdminError

        params: dict[str, Any] = _filter_params(**filters)
        if ids:
            params["ids"] = list(ids)
        if all_ or (name == "flush" and not params):  # a bare flush is postqueue -f
            params["all"] = True
        if not params:
            raise click.UsageError("name the messages: IDs, --all, or a filter such as --domain")
        if confirm and not yes and not ids:
            what = "every message" if all_ and len(params) == 1 else "the matching messages"
            click.confirm(f"{name.capitalize()} {what}?", abort=True)
        config = _config(config_path, queue_dir)

        async def online(client: Any) -> dict[str, Any]:
            try:
                result: dict[str, Any] = await client.post(f"/queue/{name}", params)
            except AdminError as exc:
                raise click.ClickException(str(exc)) from None
            return result

        async def offline(q: Any) -> dict[str, Any]:
            by = f"uid:{os.getuid()}"
            try:
                # A local queue's schedule is rebuilt from its files at the next start: a flush
                # is stored there. A shared (Redis) queue stores its schedule anyway.
                stored = config.storage.type.local
                return await admin.run_action(q, name, params, by, stored=stored)
            except admin.HttpError as exc:
                raise click.ClickException(str(exc)) from None

        _log_offline_actions()  # only the offline path logs in this process
        results = _run(QueueAccess(config).each(online, offline))
        count = sum(r["count"] for r in results)
        click.echo(f"{name}: {count} message{'s' if count != 1 else ''}")
        for result in results:
            for new in result.get("ids", []):
                click.echo(f"  new id {new}")
        if ids and count == 0:
            sys.exit(1)


_action_command(
    "flush",
    "Attempt messages now: IDs, --all or a filter; with none of them, every message (like"
    " postqueue -f). Without a daemon the new time is stored: the next start attempts them.",
)
_action_command("delete", "Remove messages without a bounce.", confirm=True)
_action_command("hold", "Hold messages: never attempted until released (survives restarts).")
_action_command("release", "Release held messages.")
_action_command("bounce", "Give up on messages now and bounce them to their senders.", confirm=True)
_action_command("requeue", "Store messages again as new (new id, attempts reset, due now).")


@queue.command("shape")
@_queue_options
@click.option("--by", type=click.Choice(["recipient", "sender"]), default="recipient")
@click.option("--top", type=int, default=3, help="Commonest last replies per domain.")
@click.option("--json", "as_json", is_flag=True)
def shape_(config_path: str | None, queue_dir: str | None, by: str, top: int,
           as_json: bool) -> None:  # fmt: skip
    """Age histogram per domain (like Postfix's qshape), and why messages are stuck."""
    from smtpq.daemon import ops

    config = _config(config_path, queue_dir)

    async def online(client: Any) -> dict[str, Any]:
        result: dict[str, Any] = await client.get(f"/queue/shape?by={by}&top={top}")
        return result

    async def offline(q: Any) -> dict[str, Any]:
        now = q.clock.time()
        return (await ops.shape(ops.iter_messages(q.store, now), now, by)).to_dict(top)

    data = ops.merge_shapes(_run(QueueAccess(config).each(online, offline, changes=False)), top)
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(ops.render_shape(data))


@queue.command("destinations")
@_queue_options
@click.option("--no-scan", is_flag=True, help="Skip counting the queued messages (faster).")
@click.option("--json", "as_json", is_flag=True)
def destinations_(config_path: str | None, queue_dir: str | None, no_scan: bool,
                  as_json: bool) -> None:  # fmt: skip
    """Each destination: queued, waiting, in flight, window/limit, rate, state (dead until T,
    with the last error). Like qshape beside postqueue -j's delay reasons."""
    from smtpq.daemon.destinations import (
        describe_destinations,
        destination_setup,
        merge_destinations,
        render_destinations,
    )
    from smtpq.daemon.server import build_relay

    config = _config(config_path, queue_dir)

    async def online(client: Any) -> dict[str, Any]:
        result: dict[str, Any] = await client.get(f"/queue/destinations?scan={int(not no_scan)}")
        return result

    async def offline(q: Any) -> dict[str, Any]:
        # The stored queue, and the marks where they are shared (Redis); no scheduler runs.
        _, store = destination_setup(config, 1)
        relay = build_relay(config)
        try:
            return await describe_destinations(q, relay, store)
        finally:
            await store.close()
            await relay.close()

    data = merge_destinations(_run(QueueAccess(config).each(online, offline, changes=False)))
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(render_destinations(data))


if __name__ == "__main__":  # pragma: no cover
    main()
