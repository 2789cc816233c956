"""Files on disk: bounded reads, atomic writes, trust directories.

Everything that reads a user-supplied file goes through ``read_limited`` so that a
wrong file (a disk image, /dev/zero) gives one clear line instead of eating memory.
"""

from __future__ import annotations

import datetime as dt
import os
import select
import stat
from collections.abc import Callable
from pathlib import Path

from console.core import pki
from console.core.errors import InputError
from console.core.pki import Problem
from console.core.reasons import Reason

MAX_INPUT_BYTES = 1024 * 1024  # certificates, CRLs, policies, grants, fleet files
#: how long a pipe or device named as an input may stay silent (``<(openssl ...)`` works; a
#: named pipe someone left where a policy file belongs must not hang the console)
PIPE_WAIT_S = 5.0


def _read_some(fd: int, size: int, path: str | os.PathLike[str]) -> bytes:
    """``os.read`` on a descriptor opened non-blocking: a regular file reads at once; a pipe or
    device with nothing to read yet is waited for, up to ``PIPE_WAIT_S`` each time."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            ready, _, _ = select.select([fd], [], [], PIPE_WAIT_S)
            if not ready:
                raise InputError(f"{Path(path)}: nothing to read for {PIPE_WAIT_S:g} s "
                                 f"(a pipe or device, not a file)") from None


def read_limited(path: str | os.PathLike[str], *, limit: int = MAX_INPUT_BYTES, what: str = "file") -> bytes:
    """Read a whole small file, or raise a one-line InputError.

    Never blocks for good: opened non-blocking, so a named pipe without a writer reads as
    nothing (an error naming it) instead of waiting in ``open`` forever, and a pipe or device
    that stays silent is given up after ``PIPE_WAIT_S``. (Regular files are not affected.)
    """
    try:
        # os.open/os.read, no stat (and no Path()) first: 10,000 policy files at start-up.
        # (``open(...).read(limit + 1)`` allocates limit + 1 bytes for every file: ~7x slower.)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            chunks = [_read_some(fd, min(limit + 1, 65536), path)]
            size = len(chunks[0])
            while chunks[-1] and size <= limit:
                chunks.append(_read_some(fd, min(limit + 1 - size, 1 << 20), path))
                size += len(chunks[-1])
            if not size and stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise InputError(f"{Path(path)}: a named pipe (FIFO) with nothing written to it, "
                                 f"expected a {what}")
        finally:
            os.close(fd)
        data = b"".join(chunks)
    except IsADirectoryError as exc:
        raise InputError(f"{Path(path)}: is a directory, expected a {what}") from exc
    except FileNotFoundError as exc:
        raise InputError(f"{Path(path)}: no such {what}") from exc
    except PermissionError as exc:
        raise InputError(f"{Path(path)}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"{Path(path)}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise InputError(f"{Path(path)}: larger than {limit // 1024} KiB, not a {what}")
    return data


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of it.
    ``fsync=False`` for files that may be lost in a crash (caches: rebuilt when absent)."""
    import tempfile  # writers only: readers (escort explain) need not import it

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- trust directories

def replace_dir(dest: str | os.PathLike[str], fill: Callable[[Path], None], *, prefix: str = ".new-") -> Path:
    """Build a directory with ``fill(work)`` beside ``dest``, then swap it in: readers see
    the old directory or the new one, never a half-written one; a failure leaves ``dest``
    as it was. Returns ``dest`` (resolved)."""
    import shutil
    import tempfile

    final = Path(dest).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        fill(work)
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            work.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def load_trust_dir(
    path: str | os.PathLike[str],
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], list[Problem]]:
    """Read a trust directory: ``(certs, crls, problems)`` as (source, bytes) pairs.

    Files are classified by *content*, not by name: PEM blocks (a bundle may hold
    several certificates and CRLs; each becomes its own entry, named ``file[2]``...)
    or a single DER certificate or CRL. The directory is read non-recursively and
    hidden files are skipped, so a ``private/`` folder or editor backups next to the
    certificates are never parsed. Each file goes through ``read_limited`` (1 MiB).
    A file that is unreadable, too big, a private key or neither certificate nor CRL
    becomes a ``Problem``; only a directory without any certificate is an InputError.
    """
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"{d}: no such trust directory" if not d.exists() else f"{d}: not a directory")
    try:
        entries = sorted(e for e in d.iterdir() if not e.name.startswith(".") and e.is_file())
    except PermissionError as exc:
        raise InputError(f"{d}: permission denied") from exc
    certs: list[tuple[str, bytes]] = []
    crls: list[tuple[str, bytes]] = []
    problems: list[Problem] = []
    for entry in entries:
        source = str(entry)
        try:
            data = read_limited(entry, what="certificate or CRL")
            found = _classify(data, source)
        except InputError as exc:
            problems.append(Problem(source, Reason(
                "file.invalid", str(exc), "Remove the file or replace it with a certificate or CRL.")))
            continue
        problems.extend(found[2])
        certs.extend(found[0])
        crls.extend(found[1])
    if not certs:
        raise InputError(f"no CA certificates in {d}")
    return certs, crls, problems


def _damage(kind: str, data: bytes, name: str) -> str:
    """Why one certificate or CRL entry is unusable ("" when it reads whole).

    cryptography parses lazily: a certificate with an invalid version or a duplicated
    extension, or a CRL with a damaged issuer name, loads fine and raises later, deep
    inside the trust store. Every field the store reads is read here, at the door, so
    a damaged file becomes a problem of its own instead of stopping the directory.
    """
    try:
        if kind == "certificate":
            for cert in pki.load_certificates(data, name):
                _ = (cert.version, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string())
                for ext in cert.extensions:
                    _ = ext.value
            return ""
        crl = pki.load_crl(data, name)
        _ = (crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc,
             crl.signature_hash_algorithm, crl.tbs_certlist_bytes)
        for ext in crl.extensions:
            _ = ext.value
        for entry in crl:
            _ = (entry.serial_number, entry.revocation_date_utc)
            for ext in entry.extensions:
                _ = ext.value
    except InputError as exc:
        return str(exc)
    except Exception as exc:  # untrusted bytes: ValueError, InvalidVersion, DuplicateExtension...
        what = "certificate" if kind == "certificate" else "CRL"
        return f"{name}: damaged {what} ({type(exc).__name__}: {exc})".strip()
    return ""


def _classify(
    data: bytes, source: str,
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], list[Problem]]:
    """Split one file into certificate and CRL entries by what it contains."""
    certs: list[tuple[str, bytes]] = []
    crls: list[tuple[str, bytes]] = []
    problems: list[Problem] = []
    blocks = pki.pem_blocks(data, source)
    if blocks:
        wanted = [b for b in blocks if b[0] in ("certificate", "crl")]
        for i, (kind, _label, block) in enumerate(wanted):
            name = source if len(wanted) == 1 else f"{source}[{i + 1}]"
            damage = _damage(kind, block, name)
            if damage:
                problems.append(Problem(name, Reason(
                    "file.invalid", damage.rstrip(".") + ".",
                    "Remove the file or replace it with an intact certificate or CRL.")))
                continue
            (certs if kind == "certificate" else crls).append((name, block))
        for kind, label, _block in blocks:
            if kind == "private key":
                problems.append(Problem(source, Reason(
                    "file.private_key", f"{source}: contains a private key; it was not read.",
                    "Move private keys out of the trust directory (and check who could read them).")))
            elif kind not in ("certificate", "crl"):
                problems.append(Problem(source, Reason(
                    "file.ignored", f"{source}: holds a {label} block, which a trust directory does not use.",
                    "Remove it from the trust directory.", severity="warning")))
        return certs, crls, problems
    if not data.strip():
        problems.append(Problem(source, Reason("file.ignored", f"{source}: empty file.",
                                               "Remove it.", severity="warning")))
        return certs, crls, problems
    cert_damage = _damage("certificate", data, source)
    if not cert_damage:
        certs.append((source, data))
        return certs, crls, problems
    crl_damage = _damage("crl", data, source)
    if not crl_damage:
        crls.append((source, data))
        return certs, crls, problems
    # say what it is when it looked like one of them (DER), else what it is not
    why = next((d for d in (cert_damage, crl_damage) if "damaged" in d),
               f"{source}: neither a certificate nor a CRL (PEM or DER)")
    problems.append(Problem(source, Reason(
        "file.invalid", why.rstrip(".") + ".", "Remove the file from the trust directory.")))
    return certs, crls, problems


def load_trust_store(
    path: str | os.PathLike[str], at: dt.datetime, *, missing_crl: pki.MissingCRL = "refuse",
) -> tuple[pki.TrustStore, list[Problem]]:
    """``load_trust_dir`` + ``TrustStore.build``: the CA tree of a directory and every problem."""
    certs, crls, problems = load_trust_dir(path)
    try:
        store, more = pki.TrustStore.build(certs, crls, at=at, missing_crl=missing_crl)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    return store, problems + more
