"""Which configuration file ``smtpq serve`` and ``smtpq queue`` read when no ``-c`` is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpq.daemon import config
from smtpq.daemon.config import default_config_path


def test_smtpq_config_names_the_file_even_when_it_is_missing(tmp_path: Path) -> None:
    # A name given on purpose is used as given: a typo is reported, not replaced by defaults.
    named = tmp_path / "elsewhere.toml"
    assert default_config_path({"SMTPQ_CONFIG": str(named)}) == named


def test_the_system_file_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "smtpq.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", system)
    assert default_config_path({}) is None  # not there: the built-in defaults
    system.write_text("")
    assert default_config_path({}) == system
    assert default_config_path({"SMTPQ_CONFIG": ""}) == system  # empty means unset


def test_the_system_path() -> None:
    assert Path("/etc/smtpq/smtpq.toml") == config.DEFAULT_CONFIG_PATH
