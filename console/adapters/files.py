"""Files on disk: bounded reads, atomic writes, trust directories.

Everything that reads a user-supplied file goes through ``read_limited`` so that a
wrong file (a disk image, /dev/zero) gives one clear line instead of eating memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from console.core.errors import InputError

MAX_INPUT_BYTES = 1024 * 1024  # certificates, CRLs, policies, grants, fleet files


def read_limited(path: str | os.PathLike[str], *, limit: int = MAX_INPUT_BYTES, what: str = "file") -> bytes:
    """Read a whole small file, or raise a one-line InputError."""
    p = Path(path)
    try:
        if p.is_dir():
            raise InputError(f"{p}: is a directory, expected a {what}")
        with p.open("rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError as exc:
        raise InputError(f"{p}: no such {what}") from exc
    except PermissionError as exc:
        raise InputError(f"{p}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise InputError(f"{p}: larger than {limit // 1024} KiB, not a {what}")
    return data


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
