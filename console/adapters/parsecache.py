"""Cached results of escort's two parsers of big local files: the fleet file and the policy memory.

What is cached, and why it can never change a verdict: parsing and checking the fleet
file (``fleetfile.load_fleet``: TOML, every key, type and bound, every row) and
escort's policy memory (``state.PolicyMemory``: strict JSON, every entry) is a pure
function of the files' bytes, of where they are (relative paths become absolute) and of
escort's own code. Such a result is stored under a key that is a SHA-256 over exactly
those: the bytes of every file read, the resolved directories, the home directory (``~``
in paths) and a digest of escort's parsing code (``parser_digest``: the source of
``console/core`` and ``console/adapters``, the TOML parser's version, Python's version).
The next run reads the files again, hashes them, and uses a stored result only under the
same key; any other byte, place or code means a full parse (which stores the new
result). Only successful parses are stored: a file that is refused is refused by the
parser every time, with its own message. Policies, grants and every decision are
checked by every run as before.

One more user of the same store: ``escort targets --offline`` keeps each host's chain
check (``FleetService._adopt_chains``, services/fleet.py) under a SHA-256 of the host's
certificate file and of every file of the hosts' trust directory (CA certificates,
CRLs), and adopts a result only while no instant it depends on (certificate dates, CRL
dates: core/timekey.py) lies between the time it was computed for and the time asked.

Safety is ``FleetSnapshot``'s (adapters/cache.py), whose file format this reuses: one
file per parsed file (its name hashes the kind and the file's absolute path), a header
with the key and a SHA-256 of the body, a file used only when it is a
regular file owned by the user that nobody else may write, unpickled by a loader that
builds escort's core classes and plain data only; anything else (foreign, corrupt,
another key, a body of the wrong shape) is ignored and replaced by the next parse.
A directory that cannot be written means no cache, said once (``notice``).
``ESCORT_NO_CACHE=1`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

from console.adapters.cache import FleetSnapshot, cache_dir, digest_parts, hash_sources

FORMAT = 1
#: the notices of caches that could not be written in this process (shown once by the CLI/UI)
notices: list[str] = []


@functools.cache
def parser_digest() -> str:
    """SHA-256 over the code a parse result comes from: escort's core and adapters
    source, the TOML parser's version and Python's version."""
    import rtoml

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"parsed {FORMAT} {sys.version} rtoml {getattr(rtoml, '__version__', '?')}".encode())
    for sub in ("core", "adapters"):
        hash_sources(h, root, root / sub)
    return h.hexdigest()


def tree_parts(directory: str | os.PathLike[str]) -> list[bytes | str] | None:
    """Every file under ``directory`` (sorted, recursively): its relative path and bytes,
    for a key; None when the directory cannot be read whole (then: no cache)."""
    root = Path(directory)
    parts: list[bytes | str] = []
    try:
        for path in sorted(p for p in root.rglob("*") if not p.is_dir()):
            parts += [path.relative_to(root).as_posix(), path.read_bytes()]
    except OSError:
        return None
    return parts if parts else None


def enabled() -> bool:
    return not os.environ.get("ESCORT_NO_CACHE")


def file_digest(data: bytes | str) -> str:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


class ParsedCache(FleetSnapshot):
    """The stored parse result of one file (``what``: "fleet" or "memory").

    ``load(key)`` / ``save(key, value)`` as ``FleetSnapshot``; ``key(*parts)`` makes the
    key from the inputs the caller names (always with ``parser_digest``).
    """

    def __init__(self, what: str, source: str | os.PathLike[str], directory: Path | None = None) -> None:
        # not FleetSnapshot.__init__: its name needs code_digest() (importlib.metadata, ~35 ms);
        # the code's digest is in every key instead, so a new escort replaces the same file
        self.dir = directory or cache_dir()
        scope = f"{what}\n{Path(source).resolve()}"
        self.path = self.dir / f"parsed-{what}-{hashlib.sha256(scope.encode()).hexdigest()[:32]}.cache"
        self.notice = ""
        self.why_not = ""

    @staticmethod
    def key(*parts: bytes | str) -> str:
        return digest_parts([parser_digest(), *parts])

    def store(self, key: str, value: object) -> None:
        """``save``, with the notice recorded once per process when the cache cannot be written."""
        self.save(key, value)
        if self.notice and self.notice not in notices:
            notices.append(self.notice)


def open_cache(what: str, source: str | os.PathLike[str]) -> ParsedCache | None:
    """The cache for ``source``, or None when caching is off or the cache dir is unknown."""
    if not enabled():
        return None
    try:
        return ParsedCache(what, source, cache_dir())
    except (OSError, RuntimeError, ValueError):  # no home, a path that cannot be resolved
        return None


__all__ = ["ParsedCache", "enabled", "file_digest", "notices", "open_cache", "parser_digest", "tree_parts"]
