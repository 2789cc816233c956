"""libvirt's own output never reaches the terminal (issue 14): errors and log lines.

A fresh interpreter (libvirt reads its log settings once, at initialisation) imports
escort, then libvirt, and makes libvirt fail: nothing may appear on stderr, and the
client library's log lines land in escort's state directory instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import console.cli  # what `escort` imports first
import libvirt
import console.adapters.libvirt
conn = libvirt.open("test:///default")
try:
    conn.lookupByName("no-such-vm")
except libvirt.libvirtError as exc:
    print("caught", exc.get_error_code())
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT_")}
    env.update(XDG_STATE_HOME=str(tmp_path), **extra)
    return env


def test_libvirt_errors_and_log_lines_stay_off_the_terminal(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("caught")
    assert proc.stderr == ""
    log = tmp_path / "escort" / "libvirt-client.log"
    assert "Domain not found" in log.read_text(encoding="utf-8")  # kept, in a file


def test_without_escort_libvirt_would_print(tmp_path: Path) -> None:
    """The check above can fail: plain libvirt prints the same error on stderr."""
    plain = SCRIPT.replace("import console.cli  # what `escort` imports first\n", "").replace(
        "import console.adapters.libvirt\n", "")
    proc = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=60, check=False)
    assert "Domain not found" in proc.stderr


def test_an_operators_own_libvirt_log_setting_is_kept(tmp_path: Path) -> None:
    mine = tmp_path / "mine.log"
    show = "import console, os; print(os.environ['LIBVIRT_LOG_OUTPUTS'])"
    proc = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=60,
                          check=False,
                          env=_env(tmp_path, LIBVIRT_LOG_OUTPUTS=f"1:file:{mine}"))
    assert proc.stdout.strip() == f"1:file:{mine}"
