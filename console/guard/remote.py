"""Installer that runs ON THE HYPERVISOR: ``/usr/bin/python3 -I -S -c <this file> ACTION``.

Standard library only (the host has Debian's python3 and nothing of ours yet). escort
sends this file's text as the command and, for ``install``, a tar.gz on stdin:

* ``lib/...``   the code bundle (omitted when the host already has this bundle digest)
* ``conf/...``  guard.json + trust/{host-certs,host-crls,owner-certs,owner-crls}/
* ``hook``      the launcher for /etc/libvirt/hooks/qemu.d/escort-guard

Every step is idempotent and switched in atomically (a symlink swap), so a hook call
during an install sees the old guard or the new one, never half of each. libvirtd
looks for hook scripts when it starts: if it started before the hook file existed it
is restarted (systemd when present, else the running daemon's own command line);
running guests are not touched by a libvirtd restart. One JSON object on stdout.
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from typing import Any

HOOK = "/etc/libvirt/hooks/qemu.d/escort-guard"
CONF = "/etc/libvirt/escort-guard"
LIB = "/var/lib/libvirt/escort-guard"
PIDFILE = "/run/libvirt/libvirtd.pid"
SOCK = "/run/libvirt/libvirt-sock"


def _swap(link: str, target: str) -> None:
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _prune(parent: str, keep: str) -> None:
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if entry != keep and entry.startswith("v-") and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _libvirtd_pid() -> int | None:
    try:
        with open(PIDFILE) as fh:
            pid = int(fh.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


#: libvirtd reads its hooks as it starts: one that started this long after the hook was
#: written has seen it (two clock ticks of /proc's start time, and a margin).
HOOK_SEEN_AFTER_S = 0.1


def _started_at(pid: int) -> float:
    """Process start time in seconds since the epoch, to the clock tick: /proc counts it
    from boot on CLOCK_BOOTTIME (/proc/uptime, rounded to 10 ms, is not precise enough to
    tell a libvirtd restarted a fraction of a second after the hook was written)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _answers() -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1)
        s.connect(SOCK)
        return True
    except OSError:
        return False
    finally:
        s.close()


def restart_libvirtd() -> str:
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        for unit in ("libvirtd.service", "virtqemud.service"):
            active = subprocess.run(["systemctl", "is-active", "--quiet", unit], check=False)
            if active.returncode == 0:
                subprocess.run(["systemctl", "restart", unit], check=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                return f"systemctl restart {unit}"
        return "no active libvirtd/virtqemud unit"
    pid = _libvirtd_pid()
    if pid is None:
        return "libvirtd is not running (it will see the hook when it starts)"
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode() for a in fh.read().split(b"\0") if a]
    cpus = os.sched_getaffinity(pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.05)
    else:
        raise SystemExit(json.dumps({"ok": False, "problem": f"libvirtd ({pid}) did not stop"}))
    if "--daemon" not in argv and "-d" not in argv:
        argv.append("--daemon")

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, preexec_fn=pin, close_fds=True)
    deadline = time.monotonic() + 30
    while not _answers():
        if time.monotonic() > deadline:
            raise SystemExit(json.dumps({"ok": False, "problem": "libvirtd did not come back"}))
        time.sleep(0.05)
    return "libvirtd restarted"


def probe() -> dict[str, Any]:
    lib = os.path.join(LIB, "lib")
    return {"ok": True, "bundle": os.path.basename(os.path.realpath(lib)) if os.path.islink(lib) else "",
            "hook": os.path.exists(HOOK), "python": sys.version.split()[0]}


def install(data: bytes, bundle: str, conf_id: str, force_restart: bool = False) -> dict[str, Any]:
    os.umask(0o022)
    for d in (LIB, CONF, os.path.dirname(HOOK)):
        os.makedirs(d, exist_ok=True)
    tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")  # noqa: SIM115 (in memory)
    members = tar.getmembers()
    for m in members:
        if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
            raise SystemExit(json.dumps({"ok": False, "problem": f"refusing tar member {m.name}"}))
    has_lib = any(m.name.startswith("lib/") for m in members)
    lib_dir = os.path.join(LIB, "v-" + bundle)
    steps: list[str] = []
    if has_lib:
        tmp = lib_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for m in members:
            if m.name.startswith("lib/"):
                m.name = m.name[4:]
                if m.name:
                    tar.extract(m, tmp)
        shutil.rmtree(lib_dir, ignore_errors=True)
        os.rename(tmp, lib_dir)
        steps.append("code")
    if not os.path.isdir(lib_dir):
        raise SystemExit(json.dumps({"ok": False, "problem": "the code bundle is missing on the host"}))
    _swap(os.path.join(LIB, "lib"), lib_dir)
    _prune(LIB, "v-" + bundle)
    # a fresh directory every time: the one `current` points to is never touched until the swap
    conf_dir = os.path.join(CONF, f"v-{conf_id}-{time.time_ns()}")
    tmp = conf_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for m in members:
        if m.name.startswith("conf/"):
            m.name = m.name[5:]
            if m.name:
                tar.extract(m, tmp)
    shutil.rmtree(conf_dir, ignore_errors=True)
    os.rename(tmp, conf_dir)
    _swap(os.path.join(CONF, "current"), conf_dir)
    _prune(CONF, os.path.basename(conf_dir))
    steps.append("trust material")
    member = tar.extractfile("hook")
    if member is None:
        raise SystemExit(json.dumps({"ok": False, "problem": "no hook in the payload"}))
    hook = member.read()
    old = b""
    if os.path.exists(HOOK):
        with open(HOOK, "rb") as fh:
            old = fh.read()
    if old != hook:
        tmp = os.path.join(os.path.dirname(HOOK), ".escort-guard.tmp")
        with open(tmp, "wb") as fh:
            fh.write(hook)
        os.chmod(tmp, 0o755)
        os.replace(tmp, HOOK)
        steps.append("hook")
    # self-test: the hook must run on this host's python3 and read what was just pushed
    check = subprocess.run([HOOK, "--status"], capture_output=True, timeout=120, check=False)
    try:
        status = json.loads(check.stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        status = {"ok": False, "problem": (check.stderr.decode(errors="replace").strip().splitlines()
                                           or ["the hook did not answer --status"])[-1]}
    if not status.get("ok"):
        return {"ok": False, "steps": steps, "problem": f"installed, but the guard does not work here: "
                f"{status.get('problem')} (it refuses every VM until fixed or removed)"}
    pid = _libvirtd_pid()
    restart = ""
    if force_restart or (pid is not None and _started_at(pid) <= os.stat(HOOK).st_mtime + HOOK_SEEN_AFTER_S):
        restart = restart_libvirtd()
    return {"ok": True, "steps": steps, "restart": restart}


def remove() -> dict[str, Any]:
    done: list[str] = []
    if os.path.exists(HOOK):
        os.unlink(HOOK)
        done.append("hook")
    for d in (CONF, LIB):
        if os.path.isdir(d):
            shutil.rmtree(d)
            done.append(d)
    return {"ok": True, "removed": done}


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action == "probe":
        out = probe()
    elif action == "install":
        data = sys.stdin.buffer.read()
        out = install(data, sys.argv[2], sys.argv[3], force_restart="--restart" in sys.argv)
    elif action == "remove":
        out = remove()
    else:
        out = {"ok": False, "problem": f"unknown action {action!r}"}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
