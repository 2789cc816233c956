"""Network namespaces, veth links and lab processes: thin wrappers over iproute2.

Why shell out to ``ip``: it is what lab.md measured, it is always present where the
lab can run, and it avoids a netlink dependency for a root-only tool. Every command
runs with a list of arguments (never a shell string) and a failure becomes one
``LabError`` line naming the command.

Containment rule (docs/LAB.md): we only ever create namespaces/links whose names
carry the lab's prefix, we never add a default route, and we only signal processes
whose network namespace is one of the lab's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from console.core.errors import EscortError

NETNS_DIR = Path("/run/netns")


class LabError(EscortError):
    """The lab could not be started, stopped or inspected (one line)."""

    exit_code = 1


def run(args: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; raise a one-line LabError when it fails."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              input=input_text, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{args[0]}: command not found (install the lab packages, see docs/LAB.md)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(args[:4])}: timed out after {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise LabError(f"{' '.join(args[:6])}: {last}")
    return proc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], check=check)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in a network namespace (root namespace's mounts)."""
    return run(["ip", "netns", "exec", ns, *args], check=check)


def list_netns() -> list[str]:
    """Names of all named network namespaces (``/run/netns``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def add_netns(ns: str) -> None:
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")


def del_netns(ns: str) -> None:
    if netns_exists(ns):
        ip("netns", "del", ns, check=False)


def netns_inode(ns: str) -> int | None:
    """The inode identifying a named namespace (what /proc/PID/ns/net points at)."""
    try:
        return os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return None


def pid_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] != "Z"


def pid_in_netns(pid: int, ns: str) -> bool:
    """Whether ``pid`` lives in the named namespace — the check before any kill."""
    want = netns_inode(ns)
    return want is not None and pid_alive(pid) and pid_netns_inode(pid) == want


def pids_in_netns(namespaces: Iterable[str]) -> dict[int, str]:
    """Every live process whose network namespace is one of ``namespaces``.

    Used for crash recovery: a daemon whose PID file was lost still lives in one of
    our namespaces, and deleting the namespace would not stop it.
    """
    inodes = {ino: ns for ns in namespaces if (ino := netns_inode(ns)) is not None}
    found: dict[int, str] = {}
    if not inodes:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        ino = pid_netns_inode(int(entry.name))
        if ino in inodes:
            found[int(entry.name)] = inodes[ino]
    return found


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def kill_in_ns(pid: int, ns: str, *, grace: float = 3.0) -> bool:
    """SIGTERM (then SIGKILL) ``pid`` if, and only if, it lives in ``ns``.

    Returns True when the process is gone afterwards (or was never ours to kill).
    """
    if not pid_in_netns(pid, ns):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    if pid_in_netns(pid, ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def kill_all_in_ns(targets: dict[int, str], *, grace: float = 3.0) -> list[int]:
    """SIGTERM every ``pid -> namespace`` pair at once (each checked first), wait up to
    ``grace`` seconds for all of them together, then SIGKILL what is left.

    Returns the PIDs that were signalled. Signalling together keeps ``down`` fast:
    waiting for each daemon in turn costs seconds.
    """
    signalled: list[int] = []
    for pid, ns in targets.items():
        if pid_in_netns(pid, ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in signalled):
        time.sleep(0.05)
    for pid in signalled:
        ns = targets[pid]
        if pid_in_netns(pid, ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return signalled


def link_exists(name: str, ns: str | None = None) -> bool:
    args = ["link", "show", name] if ns is None else ["-n", ns, "link", "show", name]
    return ip(*args, check=False).returncode == 0


def routes(ns: str | None = None) -> str:
    """``ip route`` (IPv4 and IPv6) of a namespace, for checks and ``status``."""
    pre = [] if ns is None else ["-n", ns]
    v4 = ip(*pre, "route", "show", check=False).stdout
    v6 = ip(*pre, "-6", "route", "show", check=False).stdout
    return v4 + v6
