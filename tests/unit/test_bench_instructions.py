"""bench/instructions.py's own arithmetic: start-up cancels out, and callgrind's total is read
from its output file (the runs under valgrind are the benchmark's, not the tests')."""

from __future__ import annotations

from pathlib import Path

import instructions
import pytest


def test_start_up_cancels_out() -> None:
    # 2,500 M to start and stop, 2.0 M per message.
    low, high = (50, 2_500_000_000 + 50 * 2_000_000), (250, 2_500_000_000 + 250 * 2_000_000)
    assert instructions.per_message(low, high) == 2_000_000


def test_the_second_run_must_carry_more() -> None:
    with pytest.raises(ValueError, match="more messages"):
        instructions.per_message((250, 3), (250, 4))


def test_the_total_is_read_from_callgrind_output(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_bytes(b"# callgrind format\nevents: Ir\nfn=main\n0 5\nsummary: 2917965062\n")
    assert instructions.callgrind_total(out) == 2_917_965_062
    out.write_bytes(b"events: Ir\ntotals: 12\n")
    assert instructions.callgrind_total(out) == 12
    out.write_bytes(b"events: Ir\n")
    with pytest.raises(ValueError, match="no summary"):
        instructions.callgrind_total(out)
