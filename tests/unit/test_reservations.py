"""The shared reservations file next to the audit log never hangs a migration."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from console.adapters.reservations import Reservations


def test_a_named_pipe_where_the_reservations_file_belongs_does_not_hang(tmp_path: Path) -> None:
    """Probe2 (lab): a FIFO at ``audit.log.reservations`` hung `escort migrate` at "starting",
    after its decision entry was written. It counts as damaged and is replaced by a file."""
    path = tmp_path / "audit.log.reservations"
    os.mkfifo(path)
    res = Reservations(path)
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(res.reserve("r1", "fra-1", 64, lambda other: True)),
                         daemon=True)
    t.start()
    t.join(3)
    assert out == [True], "reserve() is still blocked on the FIFO"
    assert stat.S_ISREG(path.stat().st_mode)
    assert [r["run"] for r in json.loads(path.read_text())] == ["r1"]
    assert res.others("fra-1") == 64
