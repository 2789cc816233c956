"""``read_limited``: every file escort reads from a path (policies, grants, certificates, CRLs,
fleet files). Wrong files give one line, never a hang: a named pipe left where a policy file
belongs used to stop ``escort explain`` in ``open`` and the console at "checking 0 of N VMs"
for good."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from console.adapters import files
from console.adapters.files import read_limited
from console.core.errors import InputError

ESCORT = str(Path(sys.executable).parent / "escort")


def test_regular_file_and_limits(tmp_path: Path) -> None:
    p = tmp_path / "a.pem"
    p.write_bytes(b"x" * 70_000)  # more than one read
    assert read_limited(p) == b"x" * 70_000
    with pytest.raises(InputError, match="larger than 64 KiB"):
        read_limited(p, limit=64 * 1024)
    with pytest.raises(InputError, match="larger than 1024 KiB, not a policy"):
        read_limited("/dev/zero", what="policy")
    with pytest.raises(InputError, match="no such policy"):
        read_limited(tmp_path / "missing.jws", what="policy")
    with pytest.raises(InputError, match="is a directory"):
        read_limited(tmp_path)


def test_named_pipe_without_a_writer_is_an_error_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "vm-1.jws"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"vm-1.jws: a named pipe \(FIFO\) with nothing written to it, "
                                         r"expected a policy"):
        read_limited(fifo, what="policy")
    assert time.monotonic() - t0 < 1


def test_silent_pipe_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "PIPE_WAIT_S", 0.2)
    r, w = os.pipe()  # a writer that holds the pipe open and never writes
    try:
        t0 = time.monotonic()
        with pytest.raises(InputError, match=r"nothing to read for 0\.2 s"):
            read_limited(f"/proc/self/fd/{r}")
        assert time.monotonic() - t0 < 2
    finally:
        os.close(r)
        os.close(w)


def test_pipe_that_writes_late_is_read_whole(tmp_path: Path) -> None:
    """As ``escort cert verify <(openssl x509 ...)`` gives it: a pipe whose writer is slow."""
    r, w = os.pipe()

    def writer() -> None:
        time.sleep(0.2)
        os.write(w, b"-----BEGIN ")
        time.sleep(0.1)
        os.write(w, b"CERTIFICATE-----\n")
        os.close(w)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert read_limited(f"/proc/self/fd/{r}") == b"-----BEGIN CERTIFICATE-----\n"
    finally:
        thread.join()
        os.close(r)


def test_explain_with_a_named_pipe_for_a_policy_file(tmp_path: Path) -> None:
    """The installed command, on a demo fleet whose vm-0001 policy file is a FIFO: exit 2 with
    one line naming it (it hung in open() before), and another VM still answers."""
    subprocess.run([ESCORT, "demo", "--vms", "4", "--hosts", "2", "--dir", str(tmp_path / "f"),
                    "--print-path"], check=True, capture_output=True)
    policy = tmp_path / "f" / "policies" / "vm-0001.jws"
    policy.unlink()
    os.mkfifo(policy)
    fleet = str(tmp_path / "f" / "fleet.toml")
    out = subprocess.run([ESCORT, "explain", "--fleet", fleet, "--offline", "vm-0001", "hv-0001"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "vm-0001.jws: a named pipe (FIFO)" in out.stderr
    ok = subprocess.run([ESCORT, "explain", "--fleet", fleet, "--offline", "vm-0002", "hv-0000"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode in (0, 1) and "Traceback" not in ok.stderr, ok
