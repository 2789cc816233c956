"""A persistent cache of *opened* signed documents (policies, grants) in the XDG cache dir.

What is cached, and why it can never hide a changed verdict: opening a token — parsing
its JWS header, decoding the owner certificate it carries in ``x5c``, checking the
signature against that certificate's key and checking the payload's schema — depends
on nothing but the token's bytes and escort's own code. The cache key is the token's
SHA-256 digest plus the kind of document, and the file name carries a digest of
escort's core source code, so any change to escort's rules starts a new cache. Every
check that depends on anything else — the owner's chain to the owners' CA and its CRLs,
dates (nbf/exp, certificate validity, nextUpdate), the VM binding, grants, host
certificates — is *not* cached and runs every time.

Safety: the directory is created 0700 and a file is used only when it belongs to the
user and nobody else may write it (a foreign file is ignored); a file that does not
parse or an entry of the wrong shape is ignored (and rebuilt on the next save); writes
are atomic (a temporary file renamed into place), so consoles running side by side
each see a whole file, the last writer's. A directory that cannot be created or
written means no cache, said once.
"""

from __future__ import annotations

import base64
import binascii
import copyreg
import datetime as dt
import functools
import hashlib
import io
import json
import os
import pickle
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import platformdirs
from cryptography import x509

from console.adapters.files import atomic_write
from console.core.envelope import Portable, token_digest
from console.core.errors import InputError
from console.core.pki.attributes import der_of
from console.core.reasons import Reason

FORMAT = 1
#: a cache file bigger than this is not read (a bound, like every other input)
MAX_BYTES = 256 * 1024 * 1024


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/escort`` (``~/.cache/escort``); ``ESCORT_CACHE_DIR`` overrides it."""
    override = os.environ.get("ESCORT_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("escort"))


@functools.cache
def code_digest() -> str:
    """SHA-256 over escort's core source (every rule a verdict comes from)."""
    import importlib.metadata  # here, not at import: ~50 ms a one-pair answer need not pay

    core = Path(__file__).resolve().parent.parent / "core"
    h = hashlib.sha256(f"format {FORMAT}".encode())
    for lib in ("cryptography", "joserfc"):  # signature checks are theirs
        try:
            h.update(f"{lib} {importlib.metadata.version(lib)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{lib} ?".encode())
    hash_sources(h, core, core)
    return h.hexdigest()[:24]


def hash_sources(h: Any, base: Path, directory: Path) -> None:
    """Feed ``h`` every ``*.py`` under ``directory`` (sorted): its path relative to ``base``
    and its bytes. The one way escort's code digests (``code_digest``, parsecache's
    ``parser_digest``) cover source files."""
    for path in sorted(directory.rglob("*.py")):
        h.update(path.relative_to(base).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")


def _decode(token: str) -> tuple[dict[str, Any], Any]:
    """Header and payload of a token already opened once under the same digest (so it passed
    the strict parser then): the standard C JSON decoder gives the same values, ~50x faster."""
    head, body, _sig = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    if not isinstance(header, dict):
        raise ValueError("header")
    return header, json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


class OpenedCache:
    """Opened tokens by (typ, digest). ``notice`` says why there is no cache, if so."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or cache_dir()
        self.path = self.dir / f"opened-{code_digest()}.json"
        self.notice = ""
        self._entries: dict[str, list[Any]] = {}
        self._chains: list[list[str]] = []
        self._chain_ids: dict[tuple[str, ...], int] = {}
        self._new = 0
        self.hits = 0
        self._load()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.notice = f"no cache of verified results: {self.path}: {exc.strerror or exc}"
            return
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_size > MAX_BYTES:
            return  # foreign or oversized: not trusted, replaced on the next save
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return  # corrupt: ignored, rebuilt
        if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("code") != code_digest()
                or not isinstance(data.get("chains"), list) or not isinstance(data.get("entries"), dict)):
            return
        chains = data["chains"]
        if all(isinstance(c, list) and all(isinstance(x, str) for x in c) for c in chains):
            self._chains = chains
            self._chain_ids = {tuple(c): i for i, c in enumerate(chains)}
            self._entries = data["entries"]

    def get(self, typ: str, token: str) -> Portable | None:
        """The opened form of ``token``, or None (absent or unusable).

        Looked up by the token's digest; the entry's payload and owner chain must also be
        exactly the token's own (decoded here, ~30 us): what the cache spares is the
        signature and schema check, never the content a verdict is made from.
        """
        token = token.strip()
        digest = token_digest(token)
        name = f"{typ}:{digest}"
        raw = self._entries.get(name)
        if raw is None:
            return None
        try:
            payload, reasons, chain = raw
            if payload is not None and not isinstance(payload, dict):
                raise TypeError("payload")
            why = tuple(Reason(r["code"], r["message"], r["fix"], r["severity"]) for r in reasons)
            if not all(isinstance(x, str) for r in why for x in (r.code, r.message, r.fix, r.severity)):
                raise TypeError("reason")
            if chain is not None and (type(chain) is not int or chain < 0):
                raise TypeError("chain")
            key = tuple(self._chains[chain]) if chain is not None else ()
            if payload is not None or key:
                header, body = _decode(token)
                same_chain = not key or tuple(header.get("x5c") or ()) == key
                if not same_chain or (payload is not None and payload != body):
                    raise ValueError("entry does not match the token")
        except (TypeError, ValueError, KeyError, IndexError, InputError, binascii.Error):
            del self._entries[name]  # unusable: forgotten, rebuilt from the token
            return None
        self.hits += 1
        return digest, payload, why, key

    # ------------------------------------------------------------------ writing
    def put(self, typ: str, opened: Iterable[Portable]) -> None:
        for digest, payload, reasons, chain in opened:
            key = f"{typ}:{digest}"
            if key in self._entries:
                continue
            chain_id: int | None = None
            if chain:
                chain_id = self._chain_ids.get(tuple(chain))
                if chain_id is None:
                    chain_id = self._chain_ids[tuple(chain)] = len(self._chains)
                    self._chains.append(list(chain))
            self._entries[key] = [dict(payload) if isinstance(payload, Mapping) else None,
                                  [{"code": r.code, "message": r.message, "fix": r.fix,
                                    "severity": r.severity} for r in reasons], chain_id]
            self._new += 1

    def save(self) -> None:
        """Write the cache if anything new was learnt; on failure, no cache (``notice``)."""
        if not self._new or self.notice:
            return
        data = json.dumps({"format": FORMAT, "code": code_digest(), "chains": self._chains,
                           "entries": self._entries}, separators=(",", ":")).encode()
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, data, mode=0o600, fsync=False)
        except OSError as exc:
            self.notice = f"no cache of verified results: {self.dir}: {exc.strerror or exc}"
            return
        self._new = 0




# ---------------------------------------------------------------------------------------------
# The whole-fleet snapshot: every verified result of one start-up check, in one file per fleet.
# ---------------------------------------------------------------------------------------------

SNAPSHOT_FORMAT = 2
_MAGIC = b"escort-snapshot"
#: modules whose classes a snapshot may contain (escort's own pure core) and the few
#: standard ones; anything else in a file means it is not ours: ignored, rebuilt
_ALLOWED_PREFIXES = ("console.core.",)
_ALLOWED = {("builtins", "frozenset"), ("builtins", "set"), ("datetime", "datetime"),
            ("datetime", "timezone"), ("datetime", "timedelta"),
            (__name__, "load_der_cert")}


def load_der_cert(der: bytes) -> x509.Certificate:
    """A certificate stored in a snapshot (as DER; cryptography objects do not pickle)."""
    return x509.load_der_x509_certificate(der)


def _cert_reduce(cert: x509.Certificate) -> tuple[object, tuple[bytes]]:
    return load_der_cert, (der_of(cert),)  # (the bytes as read, when escort read them: no re-encoding)


def _timezone_reduce(tz: dt.timezone) -> tuple[object, tuple[object, ...]]:
    """A timezone as pickle's default makes it (``timezone(offset[, name])``, which for UTC
    rebuilds the ``timezone.utc`` singleton), without the default's ``copyreg._slotnames``
    call per datetime (a C type caches no ``__slotnames__``): ~5 us of each of the two
    datetimes in every VM's stored check."""
    return dt.timezone, tz.__getinitargs__()  # type: ignore[attr-defined]


_DISPATCH: dict[type, Any] = {**copyreg.dispatch_table, x509.Certificate: _cert_reduce,
                              dt.timezone: _timezone_reduce}


class _View:
    """A read-only file over a buffer, without copying it first (``io.BytesIO`` copies a
    memoryview whole: 33 MB for a 10,000-VM snapshot's second part, ~10-30 ms of memory
    traffic before unpickling starts). The unpickler reads it frame by frame."""

    __slots__ = ("_m", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._m = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._m) if n is None or n < 0 else min(len(self._m), start + n)
        self._pos = end
        return self._m[start:end].tobytes()

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._m) - self._pos)
        memoryview(b).cast("B")[:n] = self._m[self._pos:self._pos + n]
        self._pos += n
        return n

    def readline(self, size: int = -1) -> bytes:
        start = end = self._pos  # (escort's own snapshots never need lines: protocol 5)
        while end < len(self._m):
            chunk = self._m[end:end + 65536].tobytes()
            found = chunk.find(b"\n")
            end += len(chunk) if found < 0 else found + 1
            if found >= 0:
                break
        self._pos = end
        return self._m[start:end].tobytes()


class _Unpickler(pickle.Unpickler):
    """Builds only escort's own core types (and the few listed): a snapshot can hold data,
    never code — a class outside the list makes the file unusable (ignored)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module.startswith(_ALLOWED_PREFIXES) and not name.startswith("_")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a snapshot")


class FleetSnapshot:
    """The verified results of one fleet's last full check, reused only for exactly the same inputs.

    The caller (services/fleet.py) names the inputs: ``key`` is a SHA-256 over escort's
    core code, every host's and VM's entry, every policy token, host certificate, trust
    directory file (CA certificates and CRLs) and the policy memory, byte for byte. A
    snapshot is used only under the same key, so any change to any of them means a full
    check (which writes a new snapshot). Time is checked by the caller too: the snapshot
    holds every instant its results depend on and is used only while no such instant
    lies between the time it was computed for and now (core/timekey.py).

    One file per fleet file (its name hashes the fleet file's absolute path): one read.
    Its header carries the key and a SHA-256 of the body; a body that does not match is
    corrupt and ignored; unpickling accepts escort's core classes only. Same ownership
    rules, atomic writes and "no cache, one notice" as ``OpenedCache``.
    """

    #: the key in the header ``load_split`` read last ("" before)
    key_found = ""

    def __init__(self, fleet_path: str | os.PathLike[str], directory: Path | None = None) -> None:
        self.dir = directory or cache_dir()
        scope = f"{Path(fleet_path).resolve()}\n{code_digest()}"
        self.path = self.dir / f"fleet-{hashlib.sha256(scope.encode()).hexdigest()[:32]}.snapshot"
        self.notice = ""
        self.why_not = ""  # why the last load found nothing usable (for tests and the bench)

    def _read_own(self) -> bytes | None:
        """The whole snapshot file, if it is a regular file of this user's that nobody else
        may write and within the size bound; None otherwise (``why_not`` says why)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            self.why_not = "absent"
            return None
        except OSError as exc:
            self.why_not = f"unreadable ({exc.strerror or exc})"
            return None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                    or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_size > MAX_BYTES):
                self.why_not = "foreign"
                return None
            return fh.read(MAX_BYTES + 1)

    def load(self, key: str) -> Any | None:
        """The snapshot stored under ``key``, or None (absent, other key, corrupt, foreign)."""
        data = self._read_own()
        if data is None:
            return None
        head, newline, body = data.partition(b"\n")
        fields = head.split(b" ")
        if (not newline or len(head) >= 512 or len(fields) != 4 or fields[0] != _MAGIC
                or fields[1] != str(SNAPSHOT_FORMAT).encode()):
            self.why_not = "not a snapshot"
            return None
        if fields[2] != key.encode():
            self.why_not = "inputs changed"
            return None
        if fields[3] != hashlib.sha256(body).hexdigest().encode():
            self.why_not = "corrupt"
            return None
        state = self.loads(body)
        if state is None:  # any failure to rebuild means: not usable, recompute
            self.why_not = "corrupt"
        return state

    def load_split(self, key: str | None) -> tuple[Any, memoryview, bytes] | None:
        """A snapshot stored with ``save_dumped`` under ``key``: its first part, rebuilt, and the
        rest still pickled with its SHA-256 (for ``load_rest``); None as ``load``. ``key`` None:
        under whatever key (``key_found`` says which; the caller must compare it).

        The whole file is read at once (what ``load_rest`` later rebuilds is these bytes,
        never a newer file), but only the first part is hashed and unpickled here."""
        data = self._read_own()
        if data is None:
            return None
        head, newline, _ = data[:512].partition(b"\n")
        fields = head.split(b" ")
        if (not newline or len(fields) != 6 or fields[0] != _MAGIC
                or fields[1] != str(SNAPSHOT_FORMAT).encode() or not fields[4].isdigit()):
            self.why_not = "not a snapshot"
            return None
        self.key_found = fields[2].decode("ascii", "replace")
        if key is not None and fields[2] != key.encode():
            self.why_not = "inputs changed"
            return None
        body = memoryview(data)[len(head) + 1:]
        size = int(fields[4])
        first = body[:size]
        if size > len(body) or fields[3] != hashlib.sha256(first).hexdigest().encode():
            self.why_not = "corrupt"
            return None
        state = self.loads(first)
        if state is None:
            self.why_not = "corrupt"
            return None
        return state, body[size:], bytes(fields[5])

    @classmethod
    def load_rest(cls, blob: memoryview, digest: bytes, *, intact: bool | None = None) -> Any | None:
        """The rest of a ``load_split`` snapshot, rebuilt; None when it is not what was stored.
        ``intact``: ``rest_intact(blob, digest)`` as already computed (e.g. on a thread)."""
        if not (cls.rest_intact(blob, digest) if intact is None else intact):
            return None
        return cls.loads(blob)

    @staticmethod
    def rest_intact(blob: memoryview, digest: bytes) -> bool:
        """Whether ``blob`` has the SHA-256 ``digest`` (hashlib releases the GIL meanwhile: this
        can run on a thread beside the event loop)."""
        return hashlib.sha256(blob).hexdigest().encode() == digest

    def dump_split(self, first: object, rest: object) -> tuple[bytes, bytes] | None:
        """A snapshot in two parts, pickled for ``save_dumped`` (``load_split`` rebuilds the
        first, ``load_rest`` the rest later): None, and ``notice`` says why, when they cannot
        be, or after an earlier failure."""
        if self.notice:
            return None
        try:
            return self.dumps(first), self.dumps(rest)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            self.notice = f"no cache of verified results: cannot store them ({exc})"
            return None

    def save_dumped(self, key: str, one: bytes, two: bytes) -> None:
        """The parts ``dump_split`` made, written under ``key``."""
        if self.notice:
            return
        head = b" ".join([_MAGIC, str(SNAPSHOT_FORMAT).encode(), key.encode(),
                          hashlib.sha256(one).hexdigest().encode(), str(len(one)).encode(),
                          hashlib.sha256(two).hexdigest().encode()])
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, head + b"\n" + one + two, mode=0o600, fsync=False)
        except OSError as exc:
            self.notice = f"no cache of verified results: {self.dir}: {exc.strerror or exc}"

    def matches(self, key: str) -> bool:
        """Whether the snapshot on disk claims ``key`` (its header only; ``load`` checks the rest)."""
        try:
            with open(self.path, "rb") as fh:
                head = fh.readline(512)
        except OSError:
            return False
        return head.rstrip(b"\n").split(b" ")[:3] == [_MAGIC, str(SNAPSHOT_FORMAT).encode(), key.encode()]

    @staticmethod
    def dumps(obj: object) -> bytes:
        """``obj`` pickled as a snapshot stores it (certificates as DER)."""
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = _DISPATCH
        pickler.dump(obj)
        return buf.getvalue()

    @staticmethod
    def loads(blob: bytes | memoryview) -> Any | None:
        """A part of a snapshot stored with ``dumps``; None when it cannot be rebuilt."""
        try:
            return _Unpickler(_View(blob)).load()
        except Exception:  # not usable: the caller checks anew
            return None

    def save(self, key: str, state: object) -> None:
        """Replace the snapshot (atomically); on failure, no cache (``notice``)."""
        if self.notice:
            return
        try:
            body = self.dumps(state)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            self.notice = f"no cache of verified results: cannot store them ({exc})"
            return
        head = b" ".join([_MAGIC, str(SNAPSHOT_FORMAT).encode(), key.encode(),
                          hashlib.sha256(body).hexdigest().encode()])
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, head + b"\n" + body, mode=0o600, fsync=False)
        except OSError as exc:
            self.notice = f"no cache of verified results: {self.dir}: {exc.strerror or exc}"


def digest_parts(parts: Iterable[bytes | str]) -> str:
    """SHA-256 over ``parts``, each length-prefixed (no two different lists hash alike).
    Hashed part by part: a 15 MB part (10,000 tokens) is never copied."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(b"%d:" % len(b))
        h.update(b)
    return h.hexdigest()


__all__ = ["FleetSnapshot", "OpenedCache", "cache_dir", "code_digest", "digest_parts", "hash_sources"]
