"""Memory reserved on targets by migrations in flight, shared by every escort process.

Two operators (two consoles, or a console and an ``escort evacuate``) each see the
target's free memory *before* the other's migration has copied much: both would fit,
both start, the target overfills. So a migration reserves the VM's memory on its
target just before ``migrate3`` and releases it when it ends, in a small JSON file
next to the fleet's audit log (every process of one fleet shares that log), under
``flock``. Entries of processes that are gone (crashed) are dropped when read.

Free memory as libvirt reports it already shrinks while a migration copies, so
subtracting the full reservation as well counts some memory twice: pessimistic,
never optimistic.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Reservations:
    """``target -> [{run, pid, mib, since}]`` in a JSON file, changed only under its lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _load(self) -> list[dict[str, Any]]:
        try:
            # non-blocking, regular files only: a named pipe put where this file belongs hung a
            # migration at "starting", after its decision was written (probe2, lab); it counts
            # as damaged, and the next save replaces it with a file
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return []
                data = json.loads(fh.read(16 * 1024 * 1024).decode("utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []  # damaged: start over (entries are only ever a few seconds to hours old)
        rows = data if isinstance(data, list) else []
        return [r for r in rows if isinstance(r, dict) and isinstance(r.get("pid"), int)
                and isinstance(r.get("mib"), int) and _alive(r["pid"])]

    def _save(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def others(self, target: str, *, run: str = "") -> int:
        """MiB reserved on ``target`` by every migration in flight but ``run`` (any process,
        any service in this process)."""
        with self._locked():
            rows = self._load()
        return sum(r["mib"] for r in rows if r.get("target") == target and r.get("run") != run)

    def reserve(self, run: str, target: str, mib: int, fits: Callable[[int], bool]) -> bool:
        """Atomically: ``fits(MiB reserved on target by every other migration)``; if so, add ours."""
        with self._locked():
            rows = [r for r in self._load() if r.get("run") != run]
            other = sum(r["mib"] for r in rows if r.get("target") == target)
            if not fits(other):
                self._save(rows)
                return False
            rows.append({"run": run, "pid": os.getpid(), "target": target, "mib": int(mib),
                         "since": round(time.time(), 3)})
            self._save(rows)
            return True

    def release(self, run: str) -> None:
        with self._locked():
            rows = self._load()
            kept = [r for r in rows if r.get("run") != run]
            if len(kept) != len(rows):
                self._save(kept)


__all__ = ["Reservations"]
