"""The audit log on disk: append (durably, before the action) and read back for verify.

Why each step:

* ``O_APPEND`` + ``fcntl.flock(LOCK_EX)`` around every append: two consoles (or two
  migrations in one console) never interleave half-lines, and each appender sees the
  other's entries before linking to them.
* The head (last hash and seq) is read once when the log is opened, by reading the
  file backwards from its end — not the whole file, and not on every append. Under
  the lock we only compare the file size with where our own last write ended; if
  another console appended meanwhile, we re-read the tail then.
* ``flush`` + ``os.fsync`` before ``append`` returns: the entry that records a
  decision is on disk before the migration it authorises starts. A new file's
  directory is fsynced too, so the file itself survives a crash.
* A log whose last line is incomplete (a crash mid-write, or a hand edit) is not
  appended to: linking a new entry to an unknown head would bless the damage.
  ``escort audit verify`` says what is wrong; the operator decides.
* After the fsync, the same line goes to the local syslog (``/dev/log``, or the socket
  in ``ESCORT_SYSLOG_SOCKET``; ``off`` disables it) with the tag ``escort``, facility
  authpriv: a site's existing log shipping then keeps a copy off the machine, and
  ``escort audit verify LOG --copy COPY`` compares the log with it. When there is no
  syslog socket, no copy is made (nothing fails, and nothing can tell).

What verification detects, and what it cannot, is in console/core/audit.py.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import logging.handlers
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from console.core.audit import (
    GENESIS,
    SIG_NAMESPACE,
    ChainProblem,
    ChainReport,
    line_hash,
    make_entry,
    parse_line,
    verify_chain,
    verify_signatures,
)
from console.core.errors import EscortError, InputError

_TAIL_CHUNK = 8192
_MAX_LINE = 1024 * 1024  # an audit entry is a few hundred bytes; 1 MiB means "not an audit log"


class AuditError(EscortError):
    """The audit log cannot be written: no action may proceed without its record."""


_SYSLOG: dict[str, logging.Logger | None] = {}


def _syslog_logger() -> logging.Logger | None:
    """A logger whose one handler sends to the local syslog socket with tag ``escort``."""
    path = os.environ.get("ESCORT_SYSLOG_SOCKET", "/dev/log")
    if path in _SYSLOG:
        return _SYSLOG[path]
    logger: logging.Logger | None = None
    if path != "off" and os.path.exists(path):
        try:
            handler = logging.handlers.SysLogHandler(address=path, socktype=socket.SOCK_DGRAM,
                                                     facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
            handler.ident = "escort: "
            logger = logging.getLogger(f"escort.audit.syslog.{len(_SYSLOG)}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
        except OSError:
            logger = None
    _SYSLOG[path] = logger
    return logger


def to_syslog(line: str) -> None:
    """Send one audit line to the local syslog (never raises: the log on disk is the record)."""
    logger = _syslog_logger()
    if logger is not None:
        with contextlib.suppress(Exception):
            logger.info(line)


def utc_timestamp(now: dt.datetime | None = None) -> str:
    """``2026-11-26T20:10:00.123456Z``: sortable, unambiguous, microseconds for ordering."""
    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_last_line(fd: int, size: int) -> bytes:
    """The last line of the file (with its newline), reading backwards in chunks."""
    if size == 0:
        return b""
    pos = size
    buf = b""
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        # the final byte is the last line's own newline; look for the one before it
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
        if len(buf) > _MAX_LINE:
            raise AuditError("audit log's last line is longer than 1 MiB: not an escort audit log")
    return buf


class AuditLog:
    """An append-only, hash-chained JSON-lines file. Thread-safe; safe across processes."""

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._lock = threading.Lock()
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # non-blocking open: a named pipe without a reader is ENXIO here instead of an
            # open() that waits forever (it hung `escort migrate` before any check ran)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                               | os.O_NONBLOCK | os.O_NOCTTY, 0o600)
        except IsADirectoryError as exc:
            raise InputError(f"{self.path}: is a directory, expected an audit log file") from exc
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise AuditError(_not_a_file(self.path, "a named pipe (FIFO)")) from exc
            raise AuditError(f"{self.path}: cannot open audit log ({exc.strerror or exc})") from exc
        mode = os.fstat(self._fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(self._fd)
            self._fd = -1
            kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise AuditError(_not_a_file(self.path, kind))
        os.set_blocking(self._fd, True)
        self._rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        if created:
            self._fsync_dir()
        try:
            with self._flocked():
                self._load_head()
        except BaseException:
            self.close()
            raise

    # -- head -----------------------------------------------------------------------
    def _load_head(self) -> None:
        size = os.fstat(self._fd).st_size
        last = _read_last_line(self._rfd, size)
        if not last:
            self._head, self._seq = GENESIS, 0
            self.last_ts = ""
        else:
            if not last.endswith(b"\n"):
                raise AuditError(f"{self.path}: last line is incomplete (a write was cut short); "
                                 f"run `escort audit verify {self.path}` before recording more")
            text = last[:-1].decode("utf-8", errors="replace")
            entry = parse_line(text)
            seq = entry.get("seq") if entry else None
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise AuditError(f"{self.path}: last line is not an escort audit entry; "
                                 f"run `escort audit verify {self.path}`")
            self._head, self._seq = line_hash(text), seq
            self.last_ts = str(entry.get("ts", "")) if entry else ""
        self._end = size

    @property
    def head(self) -> str:
        """Hash of the newest line: record it elsewhere to detect truncation later."""
        return self._head

    @property
    def seq(self) -> int:
        return self._seq

    # -- append ---------------------------------------------------------------------
    class _Flock:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def __enter__(self) -> None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def __exit__(self, *exc: object) -> None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _flocked(self) -> AuditLog._Flock:
        return AuditLog._Flock(self._fd)

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one entry and make it durable; returns the entry as written.

        Returns only after ``fsync``: callers perform the recorded action afterwards.
        Any failure raises ``AuditError`` and the caller must not act.
        """
        with self._lock, self._flocked():
            size = -1
            try:
                size = os.fstat(self._fd).st_size
                if size != self._end:  # another console appended since our last write
                    self._load_head()
                entry, line = make_entry(fields, seq=self._seq + 1, ts=utc_timestamp(self._clock()),
                                         prev=self._head)
                data = (line + "\n").encode("utf-8")
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                os.fsync(self._fd)
            except OSError as exc:
                # take back a partly written line (ENOSPC mid-line left a torn tail that every
                # later open refused until someone repaired the log by hand; probe2, lab)
                with contextlib.suppress(OSError):
                    if 0 <= size < os.fstat(self._fd).st_size:
                        os.ftruncate(self._fd, size)
                if exc.errno == errno.ENOSPC:
                    raise AuditError(f"{self.path}: disk full, audit entry not written") from exc
                raise AuditError(f"{self.path}: audit entry not written ({exc.strerror or exc})") from exc
            self._head, self._seq, self._end = line_hash(line), entry["seq"], size + len(data)
            self.last_ts = str(entry["ts"])
        to_syslog(line)
        return entry

    def _fsync_dir(self) -> None:
        try:
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        for name in ("_fd", "_rfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _not_a_file(path: Path, kind: str) -> str:
    return (f"{path}: is {kind}, not a regular file: an audit log must be a file escort can append "
            "to, fsync and read back; nothing was done")


def iter_lines(path: str | os.PathLike[str], *, pipe_ok: bool = False) -> Iterator[bytes]:
    """Lines of a log as stored (with newlines), streaming; InputError when unusable.

    Only a regular file, unless ``pipe_ok`` (the outside copy may be ``<(journalctl ...)``):
    a pipe is then waited for at most ``PIPE_WAIT_S`` before its first byte, never forever.
    """
    from console.adapters.files import PIPE_WAIT_S

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an audit log")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise InputError(f"{p}: no such audit log") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        if pipe_ok and not stat.S_ISFIFO(mode):
            os.close(fd)
            raise InputError(f"{p}: is neither a regular file nor a pipe, expected the log's copy")
        if not pipe_ok:
            os.close(fd)
            kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "not a regular file"
            raise InputError(f"{p}: is {kind}; `escort audit verify` reads the log twice "
                             "(chain, then signatures): copy it to a file first")
        ready, _, _ = select.select([fd], [], [], PIPE_WAIT_S)
        if not ready:
            os.close(fd)
            raise InputError(f"{p}: nothing to read for {PIPE_WAIT_S:g} s (a named pipe without a writer)")
    os.set_blocking(fd, True)
    fh = os.fdopen(fd, "rb")
    with fh:
        while True:
            line = fh.readline(_MAX_LINE + 1)
            if not line:
                return
            if len(line) > _MAX_LINE:
                raise InputError(f"{p}: a line longer than 1 MiB: not an escort audit log")
            yield line


def verify_file(path: str | os.PathLike[str], *, expect_head: str | None = None,
                admins: dict[str, str] | None = None, signatures: bool = True,
                copy: str | os.PathLike[str] | None = None) -> ChainReport:
    """Verify a log file: the chain, the admins' signatures, and optionally a copy.

    ``admins`` (id -> key fingerprint, from the fleet file) binds signatures to admins;
    ``copy`` is the syslog copy (one entry per line, e.g. ``journalctl -t escort -o cat``):
    every entry in it must be in the log, identical, and the log must not end before it.
    ``InputError`` (exit 2) when it is not a log at all.
    """
    from console.adapters.adminkey import AdminKeyProblem, sshsig_verify

    report = verify_chain(iter_lines(path), expect_head=expect_head)
    if report.entries == 0 and any(p.code != "audit.head" for p in report.problems):
        # (an empty file with --head is a log cut to nothing: audit.head, exit 1, not "not a log")
        raise InputError(f"{path}: not an escort audit log (no readable entry)")
    if not signatures and copy is None:
        return report
    texts = [raw.decode("utf-8", errors="replace").rstrip("\n") for raw in iter_lines(path)]
    problems = list(report.problems)
    warnings: list[ChainProblem] = []
    extra: dict[str, object] = {}
    if signatures:
        def verify(armored: str, message: bytes) -> str:
            try:
                return sshsig_verify(armored, message, SIG_NAMESPACE)
            except AdminKeyProblem as exc:
                raise ValueError(str(exc)) from exc

        sig = verify_signatures(texts, verify=verify, admins=admins)
        problems += sig.problems
        warnings += sig.warnings
        extra = {"signed_through": sig.covered_seq, "signers": sig.signers, "actions": sig.actions}
    if copy is not None:
        problems += _compare_copy(texts, copy)
    return ChainReport(report.entries, report.head, report.last_seq, tuple(problems), report.kinds,
                       warnings=tuple(warnings), extra=extra)


def _compare_copy(texts: list[str], copy: str | os.PathLike[str]) -> list[ChainProblem]:
    """Every entry of the outside copy must be in the log, byte for byte, at its seq."""
    by_seq: dict[int, tuple[int, str]] = {}
    for i, text in enumerate(texts):
        entry = parse_line(text)
        seq = entry.get("seq") if entry else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            by_seq.setdefault(seq, (i + 1, text))
    out: list[ChainProblem] = []
    last = max(by_seq) if by_seq else 0
    for raw in iter_lines(copy, pipe_ok=True):
        text = raw.decode("utf-8", errors="replace").rstrip("\n")
        start = text.find("{")  # tolerate a syslog prefix ("escort: ", timestamps)
        entry = parse_line(text[start:]) if start >= 0 else None
        seq = entry.get("seq") if entry else None
        if not isinstance(seq, int) or isinstance(seq, bool):
            continue
        if seq > last:
            out.append(ChainProblem(len(texts), "audit.copy_missing",
                                    f"the copy has entry seq {seq}, the log ends at {last}: "
                                    "entries were cut off the end"))
            break
        line_no, mine = by_seq.get(seq, (0, ""))
        if mine != text[start:]:
            out.append(ChainProblem(line_no, "audit.copy_mismatch",
                                    f"entry seq {seq} differs from the outside copy: it was rewritten"))
    return out


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every readable entry (for the UI's history and tests); unreadable lines skipped."""
    out: list[dict[str, Any]] = []
    for raw in iter_lines(path):
        entry = parse_line(raw.decode("utf-8", errors="replace").rstrip("\n"))
        if entry is not None:
            out.append(entry)
    return out


__all__ = ["AuditError", "AuditLog", "iter_lines", "read_entries", "utc_timestamp", "verify_file"]
