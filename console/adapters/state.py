"""What escort remembers between runs: the newest policy seen per VM.

A policy carries a monotonic ``seq``; escort remembers, per VM, the owner and the
highest ``seq`` it has accepted, so an older policy replayed later, or a policy from
another owner without a hand-over, is refused (``core.policy.PolicyBook.continuity``;
the core gets this memory as input and never touches the file).

The file lives under the user's XDG state directory
(``$XDG_STATE_HOME/escort/policies/``, by default ``~/.local/state/escort/policies/``),
one JSON file per fleet *and* owners' trust anchors: the name is a hash of the
fleet file's absolute path and the fingerprints of the owners' root CAs, so a lab
or demo whose CAs are made anew starts with a clean memory instead of refusing its
own new owners. Writes are atomic (temporary file + rename) and serialised between
consoles with ``flock`` on a lock file next to it; each write merges with what is
on disk, keeping the higher ``seq`` per VM, so two consoles never lose each other's
memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import platformdirs

from console.adapters.files import atomic_write, read_limited
from console.core import strictjson
from console.core.errors import InputError
from console.core.policy import SeenPolicy
from console.core.records import maker

STATE_VERSION = 1
#: 200,000 VMs x ~250 bytes; far above any fleet, far below memory trouble.
MAX_STATE_BYTES = 64 * 1024 * 1024


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir("escort", appauthor=False)) / "policies"


def state_path(fleet_path: str | os.PathLike[str], owner_anchors: Iterable[str]) -> Path:
    """The memory file for one fleet file and one set of owners' trust anchors."""
    scope = "\n".join([str(Path(fleet_path).resolve()), *sorted(owner_anchors)])
    return state_dir() / f"{hashlib.sha256(scope.encode()).hexdigest()[:32]}.json"


class PolicyMemory:
    """The remembered newest policy per VM UUID, read once and merged on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem = ""  # why the file could not be read ("" = fine); then nothing is written
        self.seen: Mapping[str, SeenPolicy] = {}
        #: the file's bytes that ``seen`` was read from or last written as (b"" = no file)
        self.raw = b""
        try:
            self.seen, self.raw = _read(path)
        except InputError as exc:
            self.problem = str(exc)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def record(self, updates: Mapping[str, SeenPolicy]) -> None:
        """Remember ``updates`` (already accepted by the core), merged with the file's content.

        Per VM the entry with the higher ``seq`` wins (an equal one: what is on disk),
        so a console that saw an older policy never overwrites a newer one another
        console recorded meanwhile.
        """
        if not updates or self.problem:
            return
        with self._locked():
            try:
                on_disk, self.raw = _read(self.path)
            except InputError as exc:
                self.problem = str(exc)
                return
            merged = dict(on_disk)
            changed = False
            for uuid, new in updates.items():
                old = merged.get(uuid)
                if old is None or new.seq > old.seq:
                    merged[uuid] = new
                    changed = True
            if changed:
                body = {"version": STATE_VERSION, "vms": {u: _entry(p) for u, p in sorted(merged.items())}}
                raw = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()
                atomic_write(self.path, raw, mode=0o600)
                self.raw = raw
            self.seen = merged


def _entry(p: SeenPolicy) -> dict[str, object]:
    return {"owner": p.owner, "owner_label": p.owner_label, "seq": p.seq, "digest": p.digest}


def read_raw(path: Path) -> bytes:
    """The memory file's bytes as they are now (b"" when there is none), not parsed."""
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        return f"?unreadable {exc}".encode()  # never equal to a file's content that was parsed


def _read(path: Path) -> tuple[Mapping[str, SeenPolicy], bytes]:
    """The memory in ``path`` and its bytes. The entries of bytes read before come from
    escort's cache of parse results (adapters/parsecache.py: same bytes, same code, same
    entries); other bytes are parsed and checked here, and the result stored there."""
    if not path.exists():
        return {}, b""
    data = read_limited(path, limit=MAX_STATE_BYTES, what="escort state file")
    from console.adapters import parsecache

    store = parsecache.open_cache("memory", path)
    key = store.key(parsecache.file_digest(data)) if store is not None else ""
    cols = _usable(store.load(key)) if store is not None else None
    if cols is not None:
        return SeenMemory(dict(zip(cols[0], zip(*cols[1:], strict=True), strict=True))), data
    seen = _parse(path, data)
    if store is not None:
        store.store(key, _columns(seen))
    return seen, data


_make_seen = maker(SeenPolicy)


class SeenMemory(Mapping[str, SeenPolicy]):
    """The remembered entries, each made a ``SeenPolicy`` when first looked at (a one-pair
    answer looks at one of 10,000; making all of them was ~30 ms)."""

    __slots__ = ("_made", "_rows")

    def __init__(self, rows: dict[str, tuple[str, str, int, str]]) -> None:
        self._rows = rows
        self._made: dict[str, SeenPolicy] = {}

    def __getitem__(self, uuid: str) -> SeenPolicy:
        got = self._made.get(uuid)
        if got is None:
            got = self._made[uuid] = _make_seen(*self._rows[uuid])
        return got

    def get(self, uuid: str, default: Any = None) -> Any:  # (Mapping.get without its try/except)
        got = self._made.get(uuid)
        if got is None:
            row = self._rows.get(uuid)
            if row is None:
                return default
            got = self._made[uuid] = _make_seen(*row)
        return got

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._rows

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeenMemory):
            return self._rows == other._rows
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # a mapping, compared by content


def _columns(seen: Mapping[str, SeenPolicy]) -> tuple[list[str], list[str], list[str], list[int], list[str]]:
    """(uuids, owners, owner labels, seqs, digests); each owner string stored once."""
    one: dict[str, str] = {}
    if isinstance(seen, SeenMemory):  # (its rows as they are: no SeenPolicy made for each)
        rows = seen._rows.values()
        return (list(seen._rows), [one.setdefault(r[0], r[0]) for r in rows],
                [one.setdefault(r[1], r[1]) for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    return (list(seen), [one.setdefault(p.owner, p.owner) for p in seen.values()],
            [one.setdefault(p.owner_label, p.owner_label) for p in seen.values()],
            [p.seq for p in seen.values()], [p.digest for p in seen.values()])


def _usable(state: object) -> tuple[list[str], list[str], list[str], list[int], list[str]] | None:
    """Stored columns of the right shape (checked at C speed), else None (parsed anew)."""
    if type(state) is not tuple or len(state) != 5 or any(type(c) is not list for c in state) \
            or len(set(map(len, state))) != 1:
        return None
    uuids, owners, labels, seqs, digests = state
    texts = uuids + owners + labels + digests
    if (texts and set(map(type, texts)) != {str}) or (seqs and set(map(type, seqs)) != {int}) \
            or len(set(uuids)) != len(uuids):
        return None
    return uuids, owners, labels, seqs, digests


#: the fields of an entry as escort writes them, and what it takes to be read by ``_parse_plain``
_ENTRY_FIELDS = frozenset({"owner", "owner_label", "seq", "digest"})


def _parse_plain(data: bytes) -> SeenMemory | None:
    """The memory in ``data`` read by json's C parser alone, when that is provably what the
    strict reader (``core/strictjson.py``) and ``_parse`` make of it; None otherwise (then
    ``_parse`` reads it strictly, as always). ~3x less CPU for 10,000 entries (~0.13 s).

    It answers only for a text of exactly escort's shape -- an object of ``version`` (the
    integer 1) and ``vms``, each entry an object of exactly the four fields, strings and an
    integer -- with no backslash at all (so no escape: no lone surrogate, and every string
    in the text is its parsed value), valid UTF-8 without a BOM, no integer of more than
    ``MAX_INT_DIGITS`` digits and no NaN/Infinity (both refused while parsing, with the
    strict reader's own hooks). Duplicate keys, which json's parser would merge
    silently, are ruled out by counting: in valid JSON every colon outside a string
    separates one key from its value, so the text's colons less those inside its strings
    (all of them in the parsed result when no key was dropped) must be exactly the pairs
    parsed -- a dropped duplicate leaves one colon over. Nesting is the shape's (three
    levels); a deeper text fails the shape or the parser (RecursionError) and is declined."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\\" in text or text.startswith("\ufeff"):
        return None
    # integers checked as the strict reader checks them: per number only when the text has a
    # run of digits long enough to be a refused one (a 64-digit hex digest of digits only)
    long_runs = strictjson._LONG_DIGITS in data.translate(strictjson._DIGITS_TO_1)
    try:
        body = json.loads(text, parse_constant=strictjson._constant,
                          parse_int=strictjson._int if long_runs else None)
    except (ValueError, RecursionError):
        return None
    if type(body) is not dict or len(body) != 2 or type(body.get("version")) is not int \
            or body["version"] != STATE_VERSION or type(body.get("vms")) is not dict:
        return None
    vms: dict[str, Any] = body["vms"]
    rows: dict[str, tuple[str, str, int, str]] = {}
    inside = 0  # colons inside strings ("version" and "vms" have none)
    for uuid, e in vms.items():
        if type(e) is not dict or e.keys() != _ENTRY_FIELDS:
            return None
        owner, label, seq, digest = e["owner"], e["owner_label"], e["seq"], e["digest"]
        if (type(owner) is not str or type(label) is not str or type(seq) is not int
                or type(digest) is not str):
            return None
        inside += uuid.count(":") + owner.count(":") + label.count(":") + digest.count(":")
        rows[uuid] = (owner, label, seq, digest)
    if text.count(":") - inside != 2 + 5 * len(vms):  # (the pairs: 2 + one per entry + its 4 fields)
        return None
    return SeenMemory(rows)


def _parse(path: Path, data: bytes) -> Mapping[str, SeenPolicy]:
    plain = _parse_plain(data)
    if plain is not None:
        return plain
    try:
        body = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise InputError(f"{path}: damaged state file ({exc})") from exc
    if (not isinstance(body, dict) or body.get("version") != STATE_VERSION
            or not isinstance(body.get("vms"), dict)):
        raise InputError(f"{path}: not an escort state file (version {STATE_VERSION})")
    out: dict[str, SeenPolicy] = {}
    for uuid, e in body["vms"].items():
        if not (isinstance(e, dict) and isinstance(e.get("owner"), str)
                and isinstance(e.get("owner_label"), str) and isinstance(e.get("digest"), str)
                and isinstance(e.get("seq"), int) and not isinstance(e.get("seq"), bool)):
            raise InputError(f"{path}: damaged entry for VM {uuid}")
        out[uuid] = SeenPolicy(e["owner"], e["owner_label"], e["seq"], e["digest"])
    return out


__all__ = ["PolicyMemory", "read_raw", "state_dir", "state_path"]
