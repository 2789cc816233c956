"""The host guard's verdict: may this domain start or arrive on THIS host?

The guard is a libvirt ``qemu`` hook on every hypervisor (console/guard/hook.py does
the I/O there). It asks exactly the question escort asks before a migration, with
exactly the same code: the owner's policy is verified by ``PolicyBook`` against the
owners' CAs, the host's own certificate (the one QEMU presents) is checked by
``TrustStore.verify_host`` against the host CA tree and its CRLs, and
``decisions.decide`` combines them. There is no second rule set here; only what a
hook adds around it:

* a domain that the fleet knows to carry a policy but arrives without one was
  stripped: refused (``guard.policy_stripped``);
* a domain without any policy: the host's setting (``no_policy``: "admit", logged,
  or "refuse");
* no rollback, no owner swap: ``PolicyBook.continuity`` — the very check the console
  runs — against the newest policy known per VM, which is what escort remembered
  (pushed in ``guard.json`` as ``seen``) merged with what this guard admitted itself
  (the hook keeps that memory on the host; it is an input here);
* anything the guard cannot read or parse: refused (fail closed), one line.

Bytes in, a ``GuardVerdict`` out; no clock, no files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import pki, strictjson
from .decisions import Decision, HostCheck, VMCheck, decide
from .envelope import reason
from .errors import InputError
from .policy import (
    POLICY_NS,
    PolicyBook,
    SeenPolicy,
    merge_seen,
    normalize_uuid,
    token_from_metadata_xml,
)
from .reasons import Reason

#: Bumped whenever the hook's behaviour or its files change; `guard status` shows it.
GUARD_VERSION = "3"
NoPolicy = Literal["admit", "refuse"]
NO_POLICY_MODES: tuple[str, ...] = ("admit", "refuse")
#: Hook operations the guard checks; every other one is admitted without a look.
CHECKED_OPS = {("migrate", "begin"): "incoming migration", ("prepare", "begin"): "process start",
               ("restore", "begin"): "restore"}
MAX_XML_BYTES = 4 * 1024 * 1024
_CONFIG_KEYS = {"version", "host", "no_policy", "policy_uuids", "policy_names", "host_cert",
                "trust_digest", "fleet", "missing_crl", "seen"}


@dataclass(frozen=True)
class GuardConfig:
    """What escort pushes next to the trust material (``guard.json`` on the host)."""

    host: str  # the host's name in the fleet (used in sentences)
    no_policy: NoPolicy = "admit"
    policy_uuids: frozenset[str] = frozenset()  # VMs the fleet knows to carry a policy
    policy_names: Mapping[str, str] = field(default_factory=dict)
    host_cert: str = "/etc/pki/qemu/server-cert.pem"
    version: str = GUARD_VERSION
    fleet: str = ""
    #: the fleet's ``missing_crl`` (docs/PKI.md), so the guard's verdict is escort's
    missing_crl: pki.MissingCRL = "refuse"
    #: the newest policy escort has seen per VM UUID (owner, seq): rollbacks and owner
    #: swaps are refused against it (and against what the guard admitted itself)
    seen: Mapping[str, SeenPolicy] = field(default_factory=dict)

    def as_json(self, trust_digest: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version, "host": self.host, "fleet": self.fleet,
            "no_policy": self.no_policy, "policy_uuids": sorted(self.policy_uuids),
            "policy_names": dict(sorted(self.policy_names.items())), "host_cert": self.host_cert,
            "trust_digest": trust_digest}
        if self.missing_crl != "refuse":  # only when set: guard.json (and digests) stay as they were
            out["missing_crl"] = self.missing_crl
        if self.seen:  # likewise only when there is something to remember
            out["seen"] = seen_as_json(self.seen)
        return out

    @classmethod
    def parse(cls, data: bytes) -> tuple[GuardConfig, str]:
        """``guard.json`` -> (config, the trust digest escort recorded); InputError when unusable."""
        try:  # the same strict reader as the guard's memory: no duplicate keys, NaN, huge ints
            raw = strictjson.loads(data)
        except strictjson.StrictJSONError as exc:
            raise InputError(f"guard.json is not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise InputError("guard.json is not a JSON object")
        unknown = sorted(set(raw) - _CONFIG_KEYS)
        if unknown:
            raise InputError(f"guard.json has unknown key(s) {', '.join(unknown)}")
        host = raw.get("host")
        mode = raw.get("no_policy", "admit")
        uuids = raw.get("policy_uuids", [])
        names = raw.get("policy_names", {})
        cert = raw.get("host_cert", "/etc/pki/qemu/server-cert.pem")
        if not isinstance(host, str) or not host:
            raise InputError("guard.json: host is missing")
        if mode not in NO_POLICY_MODES:
            raise InputError(f"guard.json: no_policy must be admit or refuse, not {mode!r}")
        if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
            raise InputError("guard.json: policy_uuids is not a list of UUIDs")
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise InputError("guard.json: policy_names is not a table of strings")
        if not isinstance(cert, str) or not cert.startswith("/"):
            raise InputError("guard.json: host_cert is not an absolute path")
        missing = raw.get("missing_crl", "refuse")
        if missing not in ("refuse", "warn"):
            raise InputError(f"guard.json: missing_crl must be refuse or warn, not {missing!r}")
        digest = raw.get("trust_digest", "")
        seen = seen_from_json(raw.get("seen", {}), "guard.json: seen")
        return cls(host, mode, frozenset(normalize_uuid(u) for u in uuids), dict(names), cert,
                   str(raw.get("version", "")), str(raw.get("fleet", "")),
                   "warn" if missing == "warn" else "refuse", seen), str(digest)


@dataclass(frozen=True)
class GuardMaterial:
    """The trust material as files: (name, bytes) of the host CA tree and owners' CAs."""

    host_certs: Sequence[tuple[str, bytes]]
    host_crls: Sequence[tuple[str, bytes]] = ()
    owner_certs: Sequence[tuple[str, bytes]] = ()
    owner_crls: Sequence[tuple[str, bytes]] = ()


def material_digest(material: GuardMaterial, config: GuardConfig) -> str:
    """One SHA-256 over every trust file (by role and name) and the config (not the VM list).

    escort computes it before pushing; the hook recomputes it from what is on disk,
    so `escort hosts guard status` shows stale or tampered material.
    """
    h = hashlib.sha256()
    for role, items in (("host-cert", material.host_certs), ("host-crl", material.host_crls),
                        ("owner-cert", material.owner_certs), ("owner-crl", material.owner_crls)):
        for name, data in sorted(items):
            h.update(f"{role}\0{name}\0{len(data)}\0".encode())
            h.update(data)
    cfg = config.as_json()
    for key in ("trust_digest", "version", "policy_uuids", "seen"):  # these have their own digests
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return h.hexdigest()


def vms_digest(uuids: frozenset[str]) -> str:
    """SHA-256 of the list of VMs known to carry a policy (what stripped-policy checks use)."""
    return hashlib.sha256("\n".join(sorted(uuids)).encode()).hexdigest()


def seen_as_json(seen: Mapping[str, SeenPolicy]) -> dict[str, dict[str, Any]]:
    """``seen`` as stored in guard.json and in the guard's own memory file (sorted)."""
    return {u: {"owner": p.owner, "owner_label": p.owner_label, "seq": p.seq, "digest": p.digest}
            for u, p in sorted(seen.items())}


def seen_from_json(raw: Any, what: str) -> dict[str, SeenPolicy]:
    """The inverse of ``seen_as_json``; InputError naming ``what`` when anything is off."""
    if not isinstance(raw, dict):
        raise InputError(f"{what} is not a table of VMs")
    out: dict[str, SeenPolicy] = {}
    for uuid, e in raw.items():
        if not (isinstance(e, dict) and set(e) == {"owner", "owner_label", "seq", "digest"}
                and isinstance(e["owner"], str) and e["owner"] and isinstance(e["owner_label"], str)
                and isinstance(e["digest"], str) and isinstance(e["seq"], int)
                and not isinstance(e["seq"], bool) and e["seq"] >= 0):
            raise InputError(f"{what}: damaged entry for VM {str(uuid)[:40]!r}")
        out[normalize_uuid(uuid)] = SeenPolicy(e["owner"], e["owner_label"], e["seq"], e["digest"])
    return out


def seen_digest(seen: Mapping[str, SeenPolicy]) -> str:
    """SHA-256 of the remembered policies (what `hosts guard status` compares)."""
    return hashlib.sha256(json.dumps(seen_as_json(seen), sort_keys=True).encode()).hexdigest()


def parse_memory(data: bytes, what: str) -> dict[str, SeenPolicy]:
    """The guard's own memory file on the host (``{"version": 1, "vms": {...}}``)."""
    try:
        raw = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise InputError(f"{what} is damaged ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("version") != 1 or set(raw) != {"version", "vms"}:
        raise InputError(f"{what} is not the guard's memory (version 1)")
    return seen_from_json(raw["vms"], what)


def memory_bytes(seen: Mapping[str, SeenPolicy]) -> bytes:
    return (json.dumps({"version": 1, "vms": seen_as_json(seen)}, indent=1, sort_keys=True) + "\n").encode()


def seen_for_guard(book: PolicyBook, tokens: Iterable[tuple[str, str]],
                   at: dt.datetime) -> dict[str, SeenPolicy]:
    """What escort pushes as ``seen``: its memory (``book.seen``) merged with every policy
    it would accept now (``(vm_uuid, token)`` pairs; rolled-back or swapped ones are not
    accepted, so they never raise the bar)."""
    now: dict[str, SeenPolicy] = {}
    for uuid, token in tokens:
        if not token:
            continue
        entry = book.verify(token, at, vm_uuid=uuid).seen_entry()
        if entry is not None:
            now[normalize_uuid(uuid)] = entry
    base = {normalize_uuid(u): p for u, p in book.seen.items()}
    return merge_seen(base, now)


@dataclass(frozen=True)
class GuardVerdict:
    allowed: bool
    code: str  # the first failing check, or "guard.admitted" / "guard.no_policy"
    message: str
    vm_uuid: str = ""
    vm_name: str = ""
    policy_digest: str = ""
    reasons: tuple[Reason, ...] = ()  # every failing check (errors only)
    decision: Decision | None = None  # the shared decision, when one was made
    #: on admission with a valid policy: what the guard remembers about it on this host
    seen: SeenPolicy | None = None

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.reasons) or (self.code,)

    def line(self) -> str:
        """The one line the hook prints on refusal (libvirt appends it to its error)."""
        who = self.vm_name or self.vm_uuid or "the domain"
        more = (f" (+{len(self.reasons) - 1} more: {', '.join(self.codes[1:])})"
                if len(self.reasons) > 1 else "")
        text = f"escort-guard refused {who}: {self.code}: {self.message}{more}"
        return " ".join(text.split())[:1000]


def _refuse(code: str, message: str, fix: str = "", **kw: Any) -> GuardVerdict:
    r = reason(code, message, fix)
    return GuardVerdict(False, code, r.message, reasons=(r,), **kw)


_NAME = re.compile(r"^[^\x00-\x1f]{1,200}$")


def domain_identity(xml: str) -> tuple[str, str, str]:
    """(uuid, name, policy token) from a domain XML; InputError when it cannot be read."""
    if len(xml) > MAX_XML_BYTES:
        raise InputError("the domain XML is larger than 4 MiB")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise InputError("domain XML with a DTD or entities is refused")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"the domain XML is not well-formed ({exc})") from exc
    if root.tag != "domain":
        raise InputError(f"the hook's input is not a domain XML ({root.tag})")
    name = (root.findtext("name") or "").strip()
    uuid_text = (root.findtext("uuid") or "").strip()
    try:
        uuid = normalize_uuid(uuid_text)
    except InputError as exc:
        raise InputError(f"the domain has no usable UUID ({uuid_text!r})") from exc
    if name and not _NAME.match(name):
        name = ""
    # only the policy element goes through escort's reader (the one `escort` uses on the
    # element libvirt returns): its 1 MiB limit is for a policy, not for a whole domain
    found = root.find(f"./metadata/{{{POLICY_NS}}}policy")
    token = "" if found is None else token_from_metadata_xml(ET.tostring(found, encoding="unicode"))
    return uuid, name, token


def _store(certs: Sequence[tuple[str, bytes]], crls: Sequence[tuple[str, bytes]], at: dt.datetime,
           what: str, missing_crl: pki.MissingCRL = "refuse") -> pki.TrustStore:
    """The same TrustStore escort builds from a trust directory (adapters/files.load_trust_store)."""
    if not certs:
        raise InputError(f"no {what} certificates in the guard's trust material")
    store, _problems = pki.TrustStore.build(certs, crls, at=at, missing_crl=missing_crl)
    return store


def known_policy(uuid: str, config: GuardConfig,
                 remembered: Mapping[str, SeenPolicy] | None = None) -> str:
    """Why the guard knows that VM ``uuid`` carries an owner-signed policy ("" when it does not).

    Any of: the VM list escort pushed (VMs with a policy at install time), escort's memory
    of policies (``seen``: it keeps a VM whose policy was removed since, so an install run
    after someone stripped the policy does not make the strip count as "never had one"),
    and what this guard itself admitted with a policy (``remembered``).
    """
    for label, table in (("escort's memory of policies", config.seen),
                         ("this host's memory of admitted policies", remembered or {}),
                         ("the fleet's list of VMs with a policy", config.policy_uuids)):
        if uuid in table:
            entry = table.get(uuid) if isinstance(table, Mapping) else None
            if isinstance(entry, SeenPolicy):
                return f"{label}: seq {entry.seq} signed by {entry.owner_label or entry.owner}"
            return label
    return ""


def guard_decide(domain_xml: str, host_cert: bytes, material: GuardMaterial, config: GuardConfig,
                 at: dt.datetime, remembered: Mapping[str, SeenPolicy] | None = None,
                 host_cert_error: str = "") -> GuardVerdict:
    """The guard's verdict for a domain arriving on (or starting on) ``config.host``.

    ``remembered`` is what this guard admitted before on this host (its memory file);
    together with ``config.seen`` it is the ``seen`` of the ``PolicyBook``, so an older
    policy or another owner's without a hand-over is refused with escort's own codes
    (``policy.rollback``, ``policy.owner_changed``, ``policy.handover_invalid``).
    ``host_cert_error`` is why the hook could not read the host certificate (refused with it).
    """
    try:
        uuid, name, token = domain_identity(domain_xml)
    except InputError as exc:
        return _refuse("guard.xml_unusable", str(exc), "the domain XML must be libvirt's own")
    ids: dict[str, Any] = {"vm_uuid": uuid, "vm_name": name}
    # fail closed: without usable trust material nothing is admitted, policy or not
    try:
        trust = _store(material.host_certs, material.host_crls, at, "host CA", config.missing_crl)
        owners = _store(material.owner_certs, material.owner_crls, at, "owners' CA", config.missing_crl)
    except InputError as exc:
        return _refuse("guard.trust_unusable", f"the guard's trust material is unusable: {exc}",
                       "run `escort hosts guard install` for this host", **ids)
    if not token:
        why = known_policy(uuid, config, remembered)
        if why:
            return _refuse("guard.policy_stripped",
                           f"VM {name or uuid} is known to carry an owner-signed policy ({why}), but it "
                           "arrived without one (the escort <metadata> was removed)",
                           "re-attach the owner's policy to the domain (virsh metadata) and try again",
                           **ids)
        if config.no_policy == "refuse":
            return _refuse("guard.no_policy", f"VM {name or uuid} carries no owner-signed policy, and "
                           f"host {config.host} admits only VMs with one",
                           "attach the owner's policy, or set guard_no_policy = \"admit\" for the host",
                           **ids)
        return GuardVerdict(True, "guard.no_policy",
                            f"VM {name or uuid} carries no policy; host {config.host} admits such VMs",
                            **ids)
    try:
        if host_cert_error:
            raise InputError(host_cert_error)
        certs = pki.load_certificates(host_cert, config.host_cert)
    except InputError as exc:
        return _refuse("guard.host_cert_unreadable", f"this host's certificate is unusable: {exc}",
                       f"check {config.host_cert} on the host", **ids)
    leaf, rest = certs[0], certs[1:]
    try:
        chain = trust.verify_host(leaf, at, intermediates=rest)
        attributes = pki.host_attributes(leaf, config.policy_names)
    except Exception as exc:  # untrusted bytes: any parse error refuses, one line
        return _refuse("cert.malformed", f"host {config.host}'s certificate cannot be checked ({exc})",
                       "reissue the host certificate", **ids)
    host = HostCheck.prepare(config.host, chain, attributes, reachability="up",
                             policy_names=config.policy_names)
    book = PolicyBook(owners, seen=merge_seen(config.seen, remembered or {}))
    policy = book.verify(token, at, vm_uuid=uuid)
    vm = VMCheck.prepare(uuid, name, "", policy, config.policy_names)
    known = {n.info.fingerprint: n.info.name for n in trust.nodes()}
    d = decide(vm, host, at=at, policy_names=config.policy_names, known_cas=known)
    errors = tuple(r for r in d.reasons if r.severity == "error")
    ids["policy_digest"] = policy.digest
    if d.allowed:
        return GuardVerdict(True, "guard.admitted",
                            f"VM {name or uuid} may run on {config.host} (owner's policy admits it)",
                            decision=d, seen=policy.seen_entry(), **ids)
    first = errors[0] if errors else reason("guard.refused", "refused", "")
    return GuardVerdict(False, first.code, first.message, reasons=errors, decision=d, **ids)


_GUARD_LINE = re.compile(r"escort-guard refused (?P<vm>.*?): (?P<code>[a-z_]+\.[a-z_.]+): (?P<rest>.*)")


def guard_refusal(error: str, target: str = "") -> Reason | None:
    """The guard's refusal inside a libvirt error ("Hook script execution failed: ... <line>").

    libvirt ends its error with the hook's stderr; escort shows that line as the reason
    (code ``guard.refused``) instead of a generic migration failure.
    """
    m = _GUARD_LINE.search(error or "")
    if m is None:
        return None
    where = f"host {target}'s" if target else "the target host's"
    return Reason("guard.refused", f"{where} escort guard refused the VM: {m.group('code')}: "
                  f"{m.group('rest').strip()}",
                  f"see `escort explain VM {target or 'HOST'}`; the guard logs every verdict in "
                  "/var/log/libvirt/escort-guard.log on that host"
                  )


__all__ = [
    "CHECKED_OPS",
    "GUARD_VERSION",
    "NO_POLICY_MODES",
    "GuardConfig",
    "GuardMaterial",
    "GuardVerdict",
    "domain_identity",
    "guard_decide",
    "guard_refusal",
    "known_policy",
    "material_digest",
    "memory_bytes",
    "merge_seen",
    "parse_memory",
    "seen_as_json",
    "seen_digest",
    "seen_for_guard",
    "seen_from_json",
    "vms_digest",
]
