"""Run a command in a lab host, and reap at once every process it leaves orphaned.

    python3 -I -S reaper.py CMD [ARG...]

Exits with CMD's status (CMD inherits stdin, stdout and stderr), but leaves a *child
subreaper* behind (``prctl(PR_SET_CHILD_SUBREAPER)``) that was CMD's parent: every process
below it that loses its parent — a daemon CMD started (``libvirtd --daemon``, ``sshd``),
the QEMU processes libvirtd daemonizes, a libvirtd that the guard's installer restarts —
becomes the subreaper's child instead of PID 1's and is reaped as soon as it exits. The
subreaper leaves when it has no children left.

Why: libvirt stops a QEMU (the source of a migration in Confirm, ``virsh destroy``) by
signalling it and then waiting until the process is *gone* (``kill(pid, 0)`` every
200 ms). An exited QEMU stays a zombie until its reaper collects it. On a host with
systemd that is immediate; this machine's PID 1 (a sandbox's init) reaped orphans only
~1.8 s after they exited, which made every lab migration ~2 s longer than on a real host
(docs/MIGRATION.md 2c). Standard library only: it runs with ``-I -S`` inside the lab
host's namespaces.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def _run(argv: list[str]) -> int:
    try:
        proc = subprocess.run(argv, check=False)
    except OSError as exc:
        sys.stderr.write(f"{argv[0]}: {exc}\n")
        return 127
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: reaper.py CMD [ARG...]\n")
        return 2
    r, w = os.pipe()  # not inherited by CMD (non-inheritable by default)
    if os.fork():
        # the front: CMD's status, once the subreaper below has it
        os.close(w)
        status = b""
        while chunk := os.read(r, 16):
            status += chunk
        return int(status) if status.strip().isdigit() else 1
    os.close(r)
    os.setsid()  # off the caller's terminal: a hang-up or Ctrl-C there does not end the reaper
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # if it fails, PID 1 reaps, as before
    code = _run(argv)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # let the caller see the end of CMD's output
        os.dup2(devnull, fd)
    os.write(w, str(code).encode())
    os.close(w)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
