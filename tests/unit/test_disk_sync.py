"""The sync modes of DiskStorage: the mode names, and sync='auto''s choice per batch between
one syncfs and the batch's fsyncs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from smtpq.storage.disk import SyncMode
from smtpq.storage.disk.libc import syncfs_function
from smtpq.storage.disk.sync import (
    EXPLORE_EVERY,
    RECHECK_EVERY,
    SAMPLES,
    SYNCFS_TOLERANCE,
    FlushChooser,
    Flusher,
    resolve_sync_mode,
)


def test_sync_modes_are_their_strings() -> None:
    assert [str(m) for m in SyncMode] == ["auto", "fsync", "syncfs", "none"]
    assert SyncMode("fsync") is SyncMode.FSYNC
    assert {"none": True}[SyncMode.NONE]  # equal to its string, and hashed alike


@pytest.mark.parametrize("mode", ["fsync", SyncMode.FSYNC, "none"])
def test_modes_without_syncfs_resolve_to_themselves(mode: str) -> None:
    resolved, syncfs = resolve_sync_mode(mode)
    assert (resolved, syncfs) == (SyncMode(mode), None)
    assert type(resolved) is SyncMode


def test_auto_uses_syncfs_only_where_it_reports_errors() -> None:
    resolved, syncfs = resolve_sync_mode("auto")
    if syncfs_function() is None:  # before Linux 5.8, or not Linux
        assert (resolved, syncfs) == (SyncMode.FSYNC, None)
    else:
        assert resolved is SyncMode.AUTO
        assert syncfs is not None


@pytest.mark.parametrize("mode", ["sometimes", "FSYNC", ""])
def test_unknown_modes_are_refused_by_name(mode: str) -> None:
    with pytest.raises(ValueError, match="'auto', 'fsync', 'syncfs', 'none'"):
        resolve_sync_mode(mode)


def test_each_way_is_tried_once_per_size_class_then_the_cheaper_one_is_used() -> None:
    chooser = FlushChooser()
    assert chooser.use_syncfs(2)  # a lone write: syncfs first ...
    chooser.record(True, 2, 0.002)
    assert not chooser.use_syncfs(2)  # ... then its fsyncs
    chooser.record(False, 2, 0.006)
    assert chooser.use_syncfs(2)  # one flush cost less than three
    # A big batch is a size class of its own: tried afresh.
    assert chooser.use_syncfs(200)
    chooser.record(True, 200, 0.050)  # syncfs: 50 ms (much foreign dirty data)
    assert not chooser.use_syncfs(200)
    chooser.record(False, 200, 0.020)
    assert not chooser.use_syncfs(200)
    assert chooser.use_syncfs(2)  # the lone writes' choice is unchanged


def test_batches_of_one_new_file_or_none_are_never_flushed_by_syncfs() -> None:
    chooser = FlushChooser()
    chooser.record(True, 1, 0.0001)  # ignored: no fewer calls than one fdatasync
    chooser.record(True, 0, 0.0001)
    assert not chooser.use_syncfs(1)
    assert not chooser.use_syncfs(0)
    assert chooser.use_syncfs(2)  # untried


def test_syncfs_is_kept_while_it_costs_less_than_twice_the_fsyncs() -> None:
    chooser = FlushChooser()
    for _ in range(SAMPLES):
        chooser.record(True, 2, 0.0015 * SYNCFS_TOLERANCE)
        chooser.record(False, 2, 0.0020)  # three calls, at once: a little cheaper
    assert chooser.use_syncfs(2)
    for _ in range(SAMPLES):
        chooser.record(True, 2, 0.0025 * SYNCFS_TOLERANCE)
    assert not chooser.use_syncfs(2)


def test_syncfs_is_retried_often_while_fsyncs_are_cheaper() -> None:
    chooser = FlushChooser()
    chooser.record(True, 200, 0.050)
    chooser.record(False, 200, 0.020)
    choices = [chooser.use_syncfs(200) for _ in range(4 * EXPLORE_EVERY)]
    assert choices.count(True) == 4
    # The filesystem calms down: syncfs gets cheap again and takes over.
    for _ in range(10):
        chooser.record(True, 200, 0.002)
    choices = [chooser.use_syncfs(200) for _ in range(2 * RECHECK_EVERY)]
    assert choices.count(False) == 2  # the fsyncs, rarely: syncfs's own times show a change


def test_a_dearer_syncfs_gives_way_without_waiting_for_a_recheck() -> None:
    chooser = FlushChooser()
    for _ in range(SAMPLES):
        chooser.record(True, 2, 0.001)
        chooser.record(False, 2, 0.004)
    chooser.record(True, 2, 0.100)  # one slow flush is not a trend ...
    chooser.record(True, 2, 0.100)
    assert chooser.use_syncfs(2)
    chooser.record(True, 2, 0.100)  # ... but most of the last ones are: another program's
    assert not chooser.use_syncfs(2)  # dirty data, which each syncfs waits for


def test_fsync_reports_each_files_error_in_order(tmp_path: Path) -> None:
    flusher = Flusher("fsync", threads=2)
    files = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600) for i in range(3)]
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    closed = os.open(tmp_path / "closed", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(closed)  # its fd is now invalid: EBADF
    try:
        for fd in files:
            os.write(fd, b"data")
        errors = flusher.fsync([files[0], closed, *files[1:]], [directory], files=4)
        assert [e is None for e in errors] == [True, False, True, True, True]
        assert isinstance(errors[1], OSError)
        assert errors[1].errno == errno.EBADF
        assert flusher.fsync([], [], files=0) == []
    finally:
        for fd in (*files, directory):
            os.close(fd)
        flusher.close()
