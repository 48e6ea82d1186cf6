"""A :class:`~smtpq.daemon.config.Config` written back as TOML (``smtpq config show``).

Every setting is written with its effective value, defaults included, in the layout that
:func:`~smtpq.daemon.config.load_config` reads: reading the text again gives the same Config.
TOML has no null, so a setting that is not set is a comment. Secrets (the fields a dataclass
keeps out of its repr: ``smtp.password``, ``admin.token``) can be left out, for a copy to share.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import fields
from typing import Any

from smtpq.daemon.config import RESERVED, TOP, Config, format_hostport
from smtpq.queue.destinations import DestinationLimits

__all__ = ["render_config"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def render_config(config: Config, *, secrets: bool = True) -> str:
    """The whole configuration as TOML that ``smtpq serve -c`` accepts.

    :param secrets: write passwords and tokens; else each is a comment saying it is hidden
        (and the text needs them back before ``serve`` accepts it).
    """
    lines = [f"{key} = {toml_value(getattr(config, key))}" for key in TOP]
    edge = [f"listen = {toml_value(config.listen)}"]
    sections: dict[str, Any] = {
        "edge": config.edge,
        "storage": config.storage,
        "relay": config.relay,
        "smtp": config.smtp,
        "mx": config.mx,
        "retry": config.retry,
        "admin": config.admin,
    }
    for name, section in sections.items():
        lines += ["", f"[{name}]"]
        if name == "edge":
            lines += edge
        skip = RESERVED.get(name, set())
        for f in fields(section):
            if f.name in skip:
                continue
            value = getattr(section, f.name)
            if value is None:
                lines.append(f"# {f.name} is not set")
            elif not f.repr and not secrets:
                lines.append(f"# {f.name} = (hidden)")
            else:
                lines.append(f"{f.name} = {toml_value(value)}")
    lines += ["", "[destinations]", *_limits(config.destinations.default)]
    lines.append(f"max_wait = {toml_value(config.destinations.max_wait)}")
    for pattern, limits in config.destinations.patterns:
        lines += ["", f"[destinations.{toml_key(pattern)}]", *_limits(limits)]
    lines += ["", "[routes]"]
    lines += [
        f"{toml_key(domain)} = {toml_value(format_hostport(route.host, route.port))}"
        for domain, route in sorted(config.mx.routes.items())
    ]
    return "\n".join(lines) + "\n"


def _limits(limits: DestinationLimits) -> list[str]:
    """One destination's limits, every field (a rate per second; unset: a comment)."""
    return [
        f"# {f.name} is not set" if value is None else f"{f.name} = {toml_value(value)}"
        for f in fields(limits)
        for value in [getattr(limits, f.name)]
    ]


def toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted key."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """A TOML literal for a string (or string enum), bool, number or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int | float):
        # repr gives TOML's own spellings: 300.0, 1e+20, inf, nan.
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        # A JSON string is a TOML basic string: the same quotes and escapes.
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"no TOML form for {value!r}")
