"""What a new configuration changes in a running daemon: now (SIGHUP), or at the next restart.

Pure: compares two validated :class:`~smtpq.daemon.config.Config` objects. A running daemon
can take a new relay (smarthost, MX settings, routes, the SMTP client's settings), retry
schedule, destination limits, edge limits and access rules, TLS files and credentials file,
grace period and log level or format without dropping a connection or a message. It cannot
move its listening sockets, its storage, its admin API, its host name or its number of workers
and relay slots: those are named as needing a restart, and the daemon keeps running with the
values it has.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from smtpq.daemon.config import RESERVED, TOP, Config

__all__ = ["ReloadPlan", "plan_reload"]

#: Top-level settings a reload applies.
_LIVE_TOP = {"grace_period", "log_level", "log_format"}
#: Sections a reload applies; in [edge], all but what the listening sockets are made with.
_LIVE_SECTIONS = {"edge", "relay", "smtp", "mx", "retry", "destinations"}
_RESTART_EDGE = {"implicit_tls", "reuse_port"}
_SECTIONS = ("edge", "storage", "relay", "smtp", "mx", "retry", "admin", "destinations")
_TOP = ("listen", *TOP)
#: Sections whose change means a new relay.
RELAY_SECTIONS = ("relay", "smtp", "mx")


@dataclass(frozen=True)
class ReloadPlan:
    """A reload's outcome.

    :ivar config: the configuration to run with from now on: the new one, with every setting
        that needs a restart kept at its running value.
    :ivar live: the changed settings applied now (``section.key``; ``routes`` for the table).
    :ivar restart: the changed settings that wait for a restart.
    """

    config: Config
    live: tuple[str, ...]
    restart: tuple[str, ...]

    def changes(self, section: str) -> bool:
        """Whether a setting of ``section`` (``routes`` counts as ``mx``) changes now."""
        prefix = f"{section}."
        return any(
            name.startswith(prefix) or (section == "mx" and name == "routes") for name in self.live
        )


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Compare the running configuration with a new, validated one."""
    live: list[str] = []
    restart: list[str] = []
    top: dict[str, Any] = {}
    for name in _TOP:
        old, value = getattr(running, name), getattr(new, name)
        if old == value:
            continue
        if name in _LIVE_TOP:
            live.append(name)
        else:
            restart.append(name)
            top[name] = old
    sections: dict[str, Any] = {}
    for section in _SECTIONS:
        old_part, new_part = getattr(running, section), getattr(new, section)
        kept: dict[str, Any] = {}
        for f in fields(old_part):
            if f.name in RESERVED.get(section, set()) or not f.compare:
                continue
            old, value = getattr(old_part, f.name), getattr(new_part, f.name)
            if old == value:
                continue
            name = f"{section}.{f.name}"
            if section in _LIVE_SECTIONS and not (section == "edge" and f.name in _RESTART_EDGE):
                live.append(name)
            else:
                restart.append(name)
                kept[f.name] = old
        if section == "mx" and running.mx.routes != new.mx.routes:
            live.append("routes")
        if section == "edge":
            kept["hostname"] = running.edge.hostname  # follows the (restart-only) host name
        if kept:
            sections[section] = replace(new_part, **kept)
    return ReloadPlan(replace(new, **top, **sections), tuple(live), tuple(restart))
