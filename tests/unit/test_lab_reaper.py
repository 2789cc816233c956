"""console/lab/reaper.py: the command's status and output pass through, and what the
command orphans becomes the reaper's child (not PID 1's), so it is reaped when it exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import console.lab

REAPER = Path(console.lab.__file__).with_name("reaper.py")


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-S", str(REAPER), *cmd], capture_output=True,
                          text=True, timeout=30, check=False)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_status_and_output_of_the_command_pass_through() -> None:
    done = _run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert _run("true").returncode == 0
    missing = _run("/nonexistent/escort-no-such-command")
    assert missing.returncode == 127 and "no-such-command" in missing.stderr


def test_an_orphan_of_the_command_is_the_reapers_child_and_is_reaped() -> None:
    # sh starts a daemon-like child and leaves: the child loses its parent at once
    done = _run("sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & echo $!")
    assert done.returncode == 0
    orphan = int(done.stdout.split()[0])
    try:
        parent = _ppid(orphan)
        assert parent != 1
        assert b"reaper.py" in Path(f"/proc/{parent}/cmdline").read_bytes()
        os.kill(orphan, signal.SIGTERM)
        # the reaper collects it and, with no children left, leaves itself
        deadline = time.monotonic() + 20
        while Path(f"/proc/{orphan}").exists() or Path(f"/proc/{parent}").exists():
            assert time.monotonic() < deadline, "the orphan or its reaper is still there"
            time.sleep(0.05)
    finally:
        if Path(f"/proc/{orphan}").exists():
            os.kill(orphan, signal.SIGKILL)
