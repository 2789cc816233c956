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
import functools
import hashlib
import importlib.metadata
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import platformdirs

from console.core.envelope import Portable, token_digest
from console.core.errors import InputError
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
    core = Path(__file__).resolve().parent.parent / "core"
    h = hashlib.sha256(f"format {FORMAT}".encode())
    for lib in ("cryptography", "joserfc"):  # signature checks are theirs
        try:
            h.update(f"{lib} {importlib.metadata.version(lib)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{lib} ?".encode())
    for path in sorted(core.rglob("*.py")):
        h.update(path.relative_to(core).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:24]


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
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".opened-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self.notice = f"no cache of verified results: {self.dir}: {exc.strerror or exc}"
            return
        self._new = 0


__all__ = ["OpenedCache", "cache_dir", "code_digest"]
