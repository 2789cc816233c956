"""The ``lab`` fixture: one real lab (console/lab) per test session.

The lab is named ``t<pid in hex>`` and lives in a pytest tmp dir, so a test lab and
a demo lab (``escort lab up``) coexist. Labs left behind by a test run that was
killed (its pid is gone; registered in /run/escort-lab-tests) are torn down first.

Without root or the Debian packages the fixture skips; with ESCORT_REQUIRE_LAB=1
(CI) it FAILS instead, with the reason, and tests/conftest.py also fails the run if
any ``@pytest.mark.lab`` test was skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from console.lab import Lab

REQUIRE_LAB = os.environ.get("ESCORT_REQUIRE_LAB") == "1"
NEEDED = ("ip", "nsenter", "unshare", "taskset", "libvirtd", "sshd", "ssh", "qemu-system-x86_64")
#: test labs this fixture started: name -> {"pid", "dir"} (tmpfs: gone on reboot, as
#: are the namespaces)
REGISTRY = Path("/run/escort-lab-tests")


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE_LAB:
        pytest.fail(f"lab required (ESCORT_REQUIRE_LAB=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"lab unavailable: {reason}")


def _why_no_lab() -> str:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not Path("/proc/self/ns/net").exists():
        return "needs Linux network namespaces"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [b for b in NEEDED if shutil.which(b, path=path) is None]
    if missing:
        return f"missing {', '.join(missing)} (install deps/, see docs/LAB.md)"
    try:
        import libvirt  # noqa: F401
    except ImportError as exc:
        return f"libvirt-python not importable ({exc})"
    return ""


def _reap_stale_test_labs() -> None:
    """Tear down labs of test sessions that were killed (their pid is gone).

    Only labs this fixture registered in ``REGISTRY`` are candidates, so a lab someone
    started by hand is never touched, whatever its name.
    """
    from console.lab import Lab

    for entry in sorted(REGISTRY.glob("t*")) if REGISTRY.is_dir() else []:
        try:
            info = json.loads(entry.read_text(encoding="utf-8"))
            pid, lab_dir = int(info["pid"]), str(info["dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if Path(f"/proc/{pid}").exists():
            continue  # another live test session's lab
        with contextlib.suppress(Exception):
            Lab(lab_dir, entry.name).down()
        entry.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A running lab for the whole session; torn down at the end, also on failure."""
    reason = _why_no_lab()
    if reason:
        _unavailable(reason)
    from console.lab import Lab

    base = tmp_path_factory.mktemp("lab")
    _reap_stale_test_labs()
    the_lab = Lab(base / "lab", f"t{os.getpid():x}")
    REGISTRY.mkdir(mode=0o700, exist_ok=True)
    registered = REGISTRY / the_lab.name
    registered.write_text(json.dumps({"pid": os.getpid(), "dir": str(the_lab.dir)}), encoding="utf-8")
    t0 = time.monotonic()
    try:
        the_lab.up()
    except Exception as exc:
        with contextlib.suppress(Exception):
            the_lab.down()
        registered.unlink(missing_ok=True)
        _unavailable(f"`lab up` failed: {exc}")
    print(f"\nlab {the_lab.name!r} up in {time.monotonic() - t0:.1f} s ({the_lab.dir})")
    try:
        yield the_lab
    finally:
        the_lab.down()
        registered.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def lab_ssh_dir(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding an ``ssh`` that uses the lab's ssh_config: put first on PATH, plain
    ``virsh -c qemu+ssh://...`` reaches the lab's hosts through its jump host (lab.md)."""
    d = tmp_path_factory.mktemp("virsh-path")
    (d / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {lab.ssh_config} "$@"\n')
    (d / "ssh").chmod(0o755)
    return d
