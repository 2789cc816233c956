"""Hash-chained audit entries: the chain logic (appending to disk is adapters/audit.py).

Format (one JSON object per line, UTF-8, ``\\n``-terminated)::

    {"seq": 1, "ts": "2026-11-26T20:10:00.123456Z", "kind": "decision",
     "prev": "<sha256 hex of the previous line>", "hash": "<sha256 hex of this entry
     without its 'hash' field>", ...the entry's own fields...}

Every line is the *canonical* JSON of its entry (keys sorted, no spaces, no ASCII
escaping), so a line can be re-derived from its parsed value and any re-formatting
is visible. ``prev`` links each entry to the exact bytes of the line before it (the
first entry links to ``GENESIS``), so removing, reordering or editing an entry breaks
the link at the next line. ``hash`` covers the entry itself.

What hashes alone detect: a careless edit (an entry changed without recomputing its
``hash``, or a line removed, inserted or reordered without re-linking). What they do
NOT detect on their own: anybody who edits an entry and then recomputes ``hash`` and
every later ``prev`` (a few lines of Python) — the result is a perfectly valid chain.

Signatures close that gap for everything they cover. After each entry written on an
admin's behalf, a ``signature`` entry carries an SSHSIG (PROTOCOL.sshsig, namespace
``escort-audit@escort``) by the acting admin's SSH key over the exact text of that
line; because every line's ``prev`` is the hash of the line before, a valid signature
over line N vouches for lines 1..N. A rewrite of any covered entry breaks the
signature unless the rewriter holds an admin's private key. ``verify_signatures``
checks each signature (with an injected SSHSIG verifier) and that the signing key is
the fleet file's key for the admin named; entries after the last valid signature are
reported as unsigned (refusals excepted — they authorise nothing and are often written
because no key could be proven; they are listed as warnings).

What remains undetectable without an outside anchor: cutting entries off the end back
to an earlier signature, or replacing the whole file by an older copy. The head hash
(``ChainReport.head``; ``expect_head``) recorded elsewhere, or the syslog copy of every
line (adapters/audit.py), closes that: ``escort audit verify LOG --copy COPY``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import strictjson

#: ``prev`` of the first entry: a fixed, documented value (sha256 of a label).
GENESIS = hashlib.sha256(b"escort audit log v1").hexdigest()
#: Fields the chain owns; an entry's own payload may not use them.
RESERVED = frozenset({"seq", "ts", "prev", "hash"})
#: Entry kinds escort writes. Unknown kinds still verify (the chain does not care).
KINDS = ("decision", "outcome", "reconcile", "evacuation", "note", "refusal", "signature", "emergency",
         "host_key")
#: Kinds that may stand unsigned: written when nobody's key was proven (that is the point).
#: ``drill``: a lab outage drill recorded by ``escort lab fault`` (root on the lab machine,
#: no admin acting); it changes no real host and authorises nothing.
UNSIGNED_OK = frozenset({"refusal", "signature", "drill"})
#: SSHSIG namespace of audit signatures (``ssh-keygen -Y verify -n escort-audit@escort``).
SIG_NAMESPACE = "escort-audit@escort"


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
    warnings: tuple[ChainProblem, ...] = ()
    #: signature results: "signed_through" (seq), "signers" (key -> admin), "actions" (admin -> kind -> n)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head": self.head, "last_seq": self.last_seq,
                "kinds": dict(self.kinds), "problems": [p.as_json() for p in self.problems],
                "warnings": [p.as_json() for p in self.warnings], **self.extra}


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


def signature_fields(line: str, entry: Mapping[str, Any], *, admin: str, key: str,
                     sshsig: str) -> dict[str, Any]:
    """The payload of a ``signature`` entry over ``line`` (the signed entry's exact text)."""
    return {"kind": "signature", "signs_seq": entry["seq"], "signs": line_hash(line), "admin": admin,
            "key": key, "sshsig": sshsig}


@dataclass(frozen=True)
class SignatureReport:
    problems: tuple[ChainProblem, ...]
    warnings: tuple[ChainProblem, ...]
    covered_seq: int  # every entry up to this seq is covered by a valid signature
    signers: dict[str, str]  # key fingerprint -> admin, for keys whose signatures verified
    actions: dict[str, dict[str, int]]  # admin -> kind -> entries signed on their behalf


def verify_signatures(lines: Iterable[str], *, verify: Callable[[str, bytes], str],
                      admins: Mapping[str, str] | None = None) -> SignatureReport:
    """Check every ``signature`` entry of a log (its lines, newlines stripped).

    ``verify(armored, message)`` returns the signer's SHA256 fingerprint or raises
    ``ValueError``; ``admins`` (admin id -> key fingerprint, from the fleet file) binds
    each signature to the admin it names — without it, signatures are only checked to
    be valid over their line, by the key they name.
    """
    texts: list[str] = []
    entries: list[dict[str, Any] | None] = []
    by_seq: dict[int, int] = {}
    for text in lines:
        entry = parse_line(text)
        entries.append(entry)
        texts.append(text)
        seq = entry.get("seq") if entry else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            by_seq.setdefault(seq, len(texts) - 1)
    problems: list[ChainProblem] = []
    warnings: list[ChainProblem] = []
    signers: dict[str, str] = {}
    covered = 0
    covered_index = -1
    for i, entry in enumerate(entries):
        if not entry or entry.get("kind") != "signature":
            continue
        line_no = i + 1
        target = by_seq.get(entry.get("signs_seq"))  # type: ignore[arg-type]
        admin, key = str(entry.get("admin", "")), str(entry.get("key", ""))
        if target is None or target >= i:
            problems.append(ChainProblem(line_no, "audit.signature", "signature names an entry that is not "
                                         "before it in the log"))
            continue
        text = texts[target]
        if line_hash(text) != entry.get("signs"):
            problems.append(ChainProblem(line_no, "audit.signature", f"signed entry seq "
                                         f"{entry.get('signs_seq')} was changed after it was signed"))
            continue
        try:
            signer = verify(str(entry.get("sshsig", "")), text.encode("utf-8"))
        except ValueError as exc:
            problems.append(ChainProblem(line_no, "audit.signature", f"signature over entry seq "
                                         f"{entry.get('signs_seq')} does not verify ({exc})"))
            continue
        if signer != key:
            problems.append(ChainProblem(line_no, "audit.signature",
                                         f"signature made by {signer}, but the entry says {key}"))
            continue
        if admins is not None and admins.get(admin) != signer:
            problems.append(ChainProblem(line_no, "audit.signer_unknown",
                                         f"signed by {signer}, which is not the fleet file's key for "
                                         f"admin {admin!r}"))
            continue
        named = (entries[target] or {}).get("admin")
        if isinstance(named, str) and named and named != admin:
            # an entry says admin X acted, signed with admin Y's key: Y wrote X's action (probe2:
            # a second admin's forged "lab-admin moved db-1" verified and was credited to lab-admin)
            problems.append(ChainProblem(line_no, "audit.signer_mismatch",
                                         f"entry seq {entry.get('signs_seq')} says admin {named!r} acted, "
                                         f"but it is signed by admin {admin!r} ({signer})"))
            continue
        signers[signer] = admin
        if target > covered_index:
            covered_index = target
            seq = (entries[target] or {}).get("seq")
            covered = seq if isinstance(seq, int) else covered
    actions: dict[str, dict[str, int]] = {}
    for i, entry in enumerate(entries):
        if not entry:
            continue
        kind = str(entry.get("kind", ""))
        if i <= covered_index:
            if kind != "signature":
                who = str(entry.get("admin") or "-")
                actions.setdefault(who, {})
                actions[who][kind] = actions[who].get(kind, 0) + 1
            continue
        if kind in UNSIGNED_OK or (kind == "decision" and entry.get("allowed") is False):
            if kind == "drill":
                warnings.append(ChainProblem(i + 1, "audit.unsigned_drill",
                                             f"lab drill seq {entry.get('seq')} is not covered by a "
                                             "signature (`escort lab fault` acts without an admin's key)"))
            elif kind != "signature":
                warnings.append(ChainProblem(i + 1, "audit.unsigned_refusal",
                                             f"refusal seq {entry.get('seq')} is not covered by a signature "
                                             "(it authorised nothing; no admin key had been proven)"))
            continue
        problems.append(ChainProblem(i + 1, "audit.unsigned",
                                     f"entry seq {entry.get('seq')} ({kind}) is not covered by any valid "
                                     "admin signature: it may have been rewritten"))
    return SignatureReport(tuple(problems), tuple(warnings), covered, signers, actions)


__all__ = [
    "GENESIS",
    "KINDS",
    "SIG_NAMESPACE",
    "UNSIGNED_OK",
    "ChainProblem",
    "ChainReport",
    "SignatureReport",
    "canonical_line",
    "entry_hash",
    "line_hash",
    "make_entry",
    "parse_line",
    "signature_fields",
    "verify_chain",
    "verify_signatures",
]
