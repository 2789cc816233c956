"""Hash-chained audit entries: the chain logic (appending to disk is adapters/audit.py).

Format (one JSON object per line, UTF-8, ``\\n``-terminated)::

    {"seq": 1, "ts": "2026-11-26T20:10:00.123456Z", "kind": "decision",
     "prev": "<sha256 hex of the previous line>", "hash": "<sha256 hex of this entry
     without its 'hash' field>", ...the entry's own fields...}

Every line is the *canonical* JSON of its entry (keys sorted, no spaces, no ASCII
escaping), so a line can be re-derived from its parsed value and any re-formatting
is visible. ``prev`` links each entry to the exact bytes of the line before it (the
first entry links to ``GENESIS``), so removing, reordering or editing an entry breaks
the link at the next line. ``hash`` covers the entry itself so that an edit of the
*last* line — which has no successor to break — is caught too.

What a hash chain cannot do on its own: notice that the newest entries were cut off
the end, or that someone rewrote the whole file with fresh hashes. Recording the head
(``ChainReport.head``, printed by ``escort audit verify``) elsewhere and passing it back
as ``expect_head`` closes the first gap; shipping lines to another machine closes the
second. We say so instead of pretending.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import strictjson

#: ``prev`` of the first entry: a fixed, documented value (sha256 of a label).
GENESIS = hashlib.sha256(b"escort audit log v1").hexdigest()
#: Fields the chain owns; an entry's own payload may not use them.
RESERVED = frozenset({"seq", "ts", "prev", "hash"})
#: Entry kinds escort writes. Unknown kinds still verify (the chain does not care).
KINDS = ("decision", "outcome", "reconcile", "evacuation", "note")


def canonical_line(entry: Mapping[str, Any]) -> str:
    """The one canonical JSON text of ``entry`` (no newline)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def line_hash(line: str) -> str:
    """SHA-256 hex of a line's text (without its newline): the next entry's ``prev``."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 hex of the entry's canonical JSON without its own ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return line_hash(canonical_line(body))


def make_entry(fields: Mapping[str, Any], *, seq: int, ts: str, prev: str) -> tuple[dict[str, Any], str]:
    """Build the next entry and its canonical line.

    ``fields`` is the payload (``kind`` plus whatever the action records); ``seq``,
    ``ts`` and ``prev`` come from the log's head. Raises ``ValueError`` for a payload
    that collides with the chain's own fields or is not plain JSON (a programming
    error, not user input).
    """
    clash = RESERVED & fields.keys()
    if clash:
        raise ValueError(f"audit payload uses reserved field(s): {', '.join(sorted(clash))}")
    if "kind" not in fields:
        raise ValueError("audit payload needs a 'kind'")
    entry: dict[str, Any] = {**fields, "seq": seq, "ts": ts, "prev": prev}
    entry["hash"] = entry_hash(entry)
    return entry, canonical_line(entry)


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """One thing wrong with the log: the 1-based line number, a stable code, a sentence."""

    line: int
    code: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ChainReport:
    entries: int  # lines that parsed as entries
    head: str  # hash of the last line (what the next entry's prev must be); GENESIS when empty
    last_seq: int
    problems: tuple[ChainProblem, ...] = ()
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head": self.head, "last_seq": self.last_seq,
                "kinds": dict(self.kinds), "problems": [p.as_json() for p in self.problems]}


def parse_line(text: str) -> dict[str, Any] | None:
    """The entry on one line, or ``None`` when it is not a JSON object."""
    try:
        # strict: NaN/Infinity, lone surrogates, duplicate keys or deep nesting would
        # otherwise parse and then crash (or mislead) the canonical re-encoding
        value = strictjson.loads(text)
    except strictjson.StrictJSONError:
        return None
    return value if isinstance(value, dict) else None


def _with_last(lines: Iterable[str | bytes]) -> Iterator[tuple[int, str | bytes, bool]]:
    """Stream ``(1-based index, line, is_last)`` so a big log is never held in memory."""
    it = iter(lines)
    try:
        current = next(it)
    except StopIteration:
        return
    index = 1
    for following in it:
        yield index, current, False
        current, index = following, index + 1
    yield index, current, True


def verify_chain(lines: Iterable[str | bytes], *, expect_head: str | None = None,
                 terminated: bool = True) -> ChainReport:
    """Check every link of a log given as its lines, as read from the file (with newlines).

    ``terminated=False`` accepts lines without newlines (``str.splitlines()``) and
    skips the torn-last-line check.

    Reports every problem with its line number, not just the first: an edited
    entry (its own hash no longer matches), a broken link (``prev`` is not the hash
    of the line before: something was removed, inserted or reordered there), a
    sequence gap or step back, an unreadable line (truncated or garbage in the
    middle), a last line without its newline (a write that never finished).
    """
    problems: list[ChainProblem] = []
    prev_hash = GENESIS
    prev_seq = 0
    count = 0
    kinds: dict[str, int] = {}
    total = 0
    for index, raw, is_last in _with_last(lines):
        total = index
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(ChainProblem(index, "audit.unreadable", "not UTF-8 text"))
                prev_hash = ""  # unknown: the next link cannot be checked against it
                continue
        text = raw[:-1] if raw.endswith("\n") else raw
        if not raw.endswith("\n") and is_last and raw and terminated:
            problems.append(ChainProblem(index, "audit.torn",
                                         "last line has no newline: a write was cut short"))
        if text.strip() == "":
            problems.append(ChainProblem(index, "audit.blank", "blank line inside the log"))
            continue
        entry = parse_line(text)
        if entry is None:
            problems.append(ChainProblem(index, "audit.unreadable",
                                         "not a JSON entry (truncated or overwritten)"))
            prev_hash = ""
            if prev_seq:
                prev_seq += 1  # it held one entry; don't report its seq as missing again
            continue
        count += 1
        kind = entry.get("kind")
        if isinstance(kind, str):
            kinds[kind] = kinds.get(kind, 0) + 1
        seq = entry.get("seq")
        if canonical_line(entry) != text:
            problems.append(ChainProblem(index, "audit.not_canonical",
                                         "entry was re-written (not its canonical form)"))
        if entry.get("hash") != entry_hash(entry):
            problems.append(ChainProblem(index, "audit.edited",
                                         f"entry seq {seq} was edited: its hash does not match its content"))
        if prev_hash and entry.get("prev") != prev_hash:
            what = ("the first entry does not start from the genesis value (entries before it removed)"
                    if prev_hash == GENESIS else
                    f"link broken: 'prev' is not the hash of line {index - 1} "
                    "(an entry before it was removed, inserted, reordered or edited)")
            problems.append(ChainProblem(index, "audit.link", what))
        if not isinstance(seq, int) or isinstance(seq, bool):
            problems.append(ChainProblem(index, "audit.seq", "entry has no integer 'seq'"))
        elif prev_seq and seq != prev_seq + 1:
            if seq > prev_seq + 1:
                missing = f"{prev_seq + 1}" if seq == prev_seq + 2 else f"{prev_seq + 1}-{seq - 1}"
                msg = f"seq jumps from {prev_seq} to {seq}: entry {missing} missing here (removed or moved)"
            else:
                msg = f"seq goes from {prev_seq} to {seq}: entries reordered or duplicated"
            problems.append(ChainProblem(index, "audit.seq", msg))
        elif not prev_seq and count == 1 and seq != 1 and prev_hash == GENESIS:
            problems.append(ChainProblem(index, "audit.seq",
                                         f"log starts at seq {seq}, not 1: earlier entries removed"))
        if isinstance(seq, int) and not isinstance(seq, bool):
            prev_seq = seq
        prev_hash = line_hash(text)
    head = prev_hash or ""
    if expect_head is not None and head != expect_head:
        problems.append(ChainProblem(total, "audit.head",
                                     "the log does not end at the recorded head: "
                                     "entries were cut off the end or the log was rewritten"))
    return ChainReport(entries=count, head=head, last_seq=prev_seq, problems=tuple(problems), kinds=kinds)


__all__ = [
    "GENESIS",
    "KINDS",
    "ChainProblem",
    "ChainReport",
    "canonical_line",
    "entry_hash",
    "line_hash",
    "make_entry",
    "parse_line",
    "verify_chain",
]
