"""DiskStorage's sync='auto': the choice between one syncfs and parallel fsyncs per batch."""

from __future__ import annotations

from smtpq.storage.disk.sync import SYNCFS_FROM, FlushChooser


def test_few_files_are_always_fsynced() -> None:
    chooser = FlushChooser()
    chooser.record(True, 100, 0.001)
    assert not chooser.use_syncfs(SYNCFS_FROM)


def test_each_way_is_tried_then_the_cheaper_one_is_used_and_the_other_retried() -> None:
    chooser = FlushChooser()
    assert chooser.use_syncfs(200)
    chooser.record(True, 200, 0.050)  # syncfs: 50 ms (much foreign dirty data)
    assert not chooser.use_syncfs(200)
    chooser.record(False, 200, 0.020)  # 200 fsyncs in parallel: 20 ms
    choices = [chooser.use_syncfs(200) for _ in range(64)]
    assert choices.count(True) == 4  # one try in sixteen
    # The filesystem calms down: syncfs gets cheap again and takes over.
    for _ in range(10):
        chooser.record(True, 200, 0.002)
    assert sum(chooser.use_syncfs(200) for _ in range(64)) == 60
