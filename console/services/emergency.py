"""Declared emergencies: when an owner's emergency-only grant may count.

A grant marked ``emergency_only`` lets an admin move a VM *only in an emergency*.
That is not for the admin to claim by running an evacuation: an emergency holds for
a source host only while

* it is **declared**: ``escort emergency declare HOST --reason TEXT [--hours H]`` —
  a changing action like any other (read-only mode refuses it; the operator proves
  the admin's key), recorded in the audit log with the admin's SSHSIG signature over
  the declaration, visible in the console until it ends; or
* the host is **actually down**: it did not answer the refresh made for the move.

Everything else — a healthy host evacuated without a declaration — uses ordinary
grants only. Declarations are read back from the audit log and count only when

* their ``declaration_sig`` verifies with the key of an admin listed in the fleet
  file, over the declaration's fields *including the fleet's name* (a declaration
  made for another fleet's host of the same name does not count here);
* the entry is linked into this log (its ``prev`` is the hash of the line before it)
  and a later ``signature`` entry by the same admin's key verifies over its exact
  line. Because the line carries ``prev``, that audit signature ties the declaration
  to its place in this log: copied into another fleet's log (re-hashed or not) it
  counts for nothing. (Found by probe2 on the lab: a declaration made in one fleet,
  appended to another fleet's log, let an emergency-only grant evacuate there.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from console.adapters import adminkey as ak
from console.adapters.audit import AuditLog, iter_lines
from console.core.audit import GENESIS, SIG_NAMESPACE, canonical_line, line_hash, parse_line
from console.core.errors import EscortError, InputError
from console.services.fleet import FleetService
from console.services.identity import AdminIdentity, AdminProof, append_signed, require_admin

NS_EMERGENCY = "escort-emergency@escort"


def default_audit_path() -> Path:
    """Where the audit log lives when the fleet file names none."""
    import platformdirs

    return Path(platformdirs.user_state_dir("escort")) / "audit.log"


def audit_path(fleet: FleetService) -> Path:
    """The fleet's audit log (``audit_log`` in the fleet file, else the per-user default)."""
    configured = fleet.spec.audit_log if fleet.spec else ""
    return Path(configured) if configured else default_audit_path()
MAX_HOURS = 72.0
DEFAULT_HOURS = 4.0


@dataclass(frozen=True)
class Emergency:
    host: str
    reason: str
    admin: str
    start: dt.datetime
    end: dt.datetime

    def active(self, at: dt.datetime) -> bool:
        return self.start <= at < self.end

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "reason": self.reason, "admin": self.admin,
                "from": _iso(self.start), "until": _iso(self.end)}

    def line(self) -> str:
        return f"EMERGENCY {self.host} until {self.end:%H:%M} UTC ({self.admin}: {self.reason})"


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _declaration_text(fields: Mapping[str, Any]) -> bytes:
    """What the admin signs: the declaration's own fields and the fleet's name, canonical JSON."""
    body = {k: fields[k] for k in ("fleet", "host", "reason", "admin", "from", "until")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def declare(fleet: FleetService, host: str, reason: str, *, hours: float = DEFAULT_HOURS,
                  admin: str | None = None, identity: AdminIdentity | None = None,
                  audit: AuditLog, now: dt.datetime | None = None) -> tuple[Emergency, AdminProof]:
    """Declare an emergency for ``host`` (signed by the admin's key, audited first)."""
    if not any(h.name == host for h in fleet.hosts()):
        raise InputError(f"no host {host!r} in fleet {fleet.name or fleet.path}")
    text = " ".join(reason.split())
    if not text:
        raise InputError("--reason must say why (it goes into the audit log)")
    if not 0 < hours <= MAX_HOURS:
        raise InputError(f"--hours must be more than 0 and at most {MAX_HOURS:g}")
    proof = await require_admin(fleet, f"declare an emergency for {host}", admin=admin, identity=identity,
                                audit=lambda e: asyncio.to_thread(audit.append, e))
    start = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    fields: dict[str, Any] = {"kind": "emergency", "fleet": fleet.name or "", "host": host, "reason": text,
                              "admin": proof.admin,
                              "from": _iso(start), "until": _iso(start + dt.timedelta(hours=hours))}
    if proof.key is None:  # pragma: no cover - a proof always carries its key
        raise EscortError("no key to sign the declaration with")
    try:
        fields["declaration_sig"] = await proof.key.sshsig(_declaration_text(fields), NS_EMERGENCY)
    except ak.AdminKeyProblem as exc:
        raise EscortError(f"the declaration could not be signed: {exc}") from exc
    fields["proof"] = proof.as_json()
    await append_signed(audit, fields, proof)
    return Emergency(host, text, proof.admin, start, start + dt.timedelta(hours=hours)), proof


def _parse(entry: Mapping[str, Any], admins: Mapping[str, str], fleet_name: str) -> Emergency | None:
    """A declaration for this fleet whose signature verifies with its admin's key, else None."""
    try:
        admin = str(entry["admin"])
        fp = admins.get(admin, "")
        if not fp or entry["fleet"] != fleet_name:
            return None
        signer = ak.sshsig_verify(str(entry["declaration_sig"]), _declaration_text(entry), NS_EMERGENCY)
        if signer != fp:
            return None
        start = dt.datetime.strptime(str(entry["from"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        end = dt.datetime.strptime(str(entry["until"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        return Emergency(str(entry["host"]), str(entry["reason"]), admin, start, end)
    except (KeyError, ValueError, TypeError, ak.AdminKeyProblem):
        return None


def _audit_signed(texts: list[str], index: int, fp: str) -> bool:
    """Line ``index`` is linked to the line before it and a later audit signature by key ``fp``
    verifies over its exact text (so it is this log's entry, at this place)."""
    text = texts[index]
    entry = parse_line(text)
    if entry is None or canonical_line(entry) != text:
        return False
    if entry.get("prev") != (line_hash(texts[index - 1]) if index else GENESIS):
        return False
    digest = line_hash(text)
    for later in texts[index + 1:]:
        if f'"signs":"{digest}"' not in later:  # cheap filter before parsing
            continue
        sig = parse_line(later)
        if not sig or sig.get("kind") != "signature" or sig.get("signs_seq") != entry.get("seq") \
                or sig.get("signs") != digest or sig.get("key") != fp:
            continue
        try:
            if ak.sshsig_verify(str(sig.get("sshsig", "")), text.encode("utf-8"), SIG_NAMESPACE) == fp:
                return True
        except ak.AdminKeyProblem:
            continue
    return False


def declared(fleet: FleetService, audit_path: str | Path, at: dt.datetime | None = None,
             lines: Iterable[str] | None = None) -> dict[str, Emergency]:
    """Emergencies in force at ``at`` (host -> the one ending last), from the audit log.

    ``lines``: the log's lines (without newlines) instead of reading ``audit_path``.
    """
    when = at or dt.datetime.now(dt.UTC)
    admins = {a.id: a.ssh_key_fingerprint for a in fleet.admins}
    try:
        texts = list(lines) if lines is not None else [
            raw.decode("utf-8", errors="replace").rstrip("\n") for raw in iter_lines(audit_path)]
    except EscortError:
        return {}
    out: dict[str, Emergency] = {}
    for i, text in enumerate(texts):
        if '"kind":"emergency"' not in text:
            continue
        e = parse_line(text)
        if e is None or e.get("kind") != "emergency":
            continue
        em = _parse(e, admins, fleet.name or "")
        if em is None or not em.active(when) or not _audit_signed(texts, i, admins[em.admin]):
            continue
        if em.host not in out or out[em.host].end < em.end:
            out[em.host] = em
    return out


__all__ = ["DEFAULT_HOURS", "MAX_HOURS", "NS_EMERGENCY", "Emergency", "declare", "declared"]
