"""Owner-signed, time-limited migration grants for admins.

A grant lets one admin (identified by id plus SSH key and/or certificate
fingerprint) migrate named VMs (UUIDs, or every VM whose *owner-signed* policy
carries a label) between ``nbf`` and ``exp``, optionally only in an emergency
(evacuation). It is verified offline, like a policy, and must be signed by the same
owner as the VM's policy: an owner cannot hand out access to someone else's VM.

Labels come from the VM's signed policy, never from the fleet file, so an admin
cannot widen a grant by editing the fleet file.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .envelope import (
    TYP_GRANT,
    VERSION,
    EnvelopeVerifier,
    OwnerIdentity,
    OwnerVerifier,
    decode_unverified,
    reason,
)
from .envelope import sign as sign_envelope
from .errors import InputError
from .policy import normalize_fingerprint, normalize_uuid
from .reasons import Reason

GRANT_FIELDS = frozenset({"admin", "vms", "label", "emergency_only"})
ADMIN_FIELDS = frozenset({"id", "ssh_key", "cert_sha256"})
_SSH_FP = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")


def normalize_ssh_fingerprint(text: str) -> str:
    """``SHA256:<base64>`` as ``ssh-keygen -lf`` prints it; InputError otherwise."""
    t = text.strip()
    if not _SSH_FP.match(t):
        raise InputError(f"{text!r} is not an SSH key fingerprint (SHA256:<43 base64 characters>)")
    return t.rstrip("=")


@dataclass(frozen=True)
class AdminRef:
    """An admin as a grant names them, or as the fleet file describes them."""

    id: str
    ssh_key: str = ""  # "SHA256:..."
    cert_sha256: str = ""  # lowercase hex


@dataclass(frozen=True)
class Grant:
    admin: AdminRef
    vms: frozenset[str]  # UUIDs
    label: str
    not_before: dt.datetime
    not_after: dt.datetime
    emergency_only: bool
    jti: str
    owner: str  # iss

    def scope(self) -> str:
        parts = []
        if self.vms:
            parts.append(f"{len(self.vms)} VM(s)" if len(self.vms) > 1 else next(iter(self.vms)))
        if self.label:
            parts.append(f"label {self.label!r}")
        return " and ".join(parts)


@dataclass(frozen=True)
class GrantResult:
    """A grant token after verification at one time (time-independent of VM and admin)."""

    digest: str
    source: str
    grant: Grant | None
    owner: OwnerIdentity | None
    reasons: tuple[Reason, ...] = ()
    claimed_admin: str = ""  # from the *unverified* payload, only to say whose grant is broken

    @property
    def valid(self) -> bool:
        return self.grant is not None and not self.reasons


def _parse_body(payload: Mapping[str, Any]) -> tuple[Grant | None, list[Reason]]:
    reasons: list[Reason] = []

    def bad(message: str) -> None:
        reasons.append(reason("grant.malformed", message, "issue the grant again with `escort grant issue`"))

    admin = payload.get("admin")
    ref: AdminRef | None = None
    if not isinstance(admin, dict):
        bad("the grant names no admin")
    else:
        extra = sorted(set(admin) - ADMIN_FIELDS)
        if extra:
            reasons.append(reason("grant.unknown_field", f"the grant's admin has unknown field(s) "
                                  f"{', '.join(extra)}", "issue the grant again with `escort grant issue`"))
        aid, ssh_key, cert = admin.get("id"), admin.get("ssh_key", ""), admin.get("cert_sha256", "")
        if not isinstance(aid, str) or not aid:
            bad("the grant's admin has no id")
        elif not isinstance(ssh_key, str) or not isinstance(cert, str) or not (ssh_key or cert):
            bad("the grant binds the admin to no key (ssh_key and/or cert_sha256)")
        elif not ssh_key:
            # escort proves who acts by their SSH key only (docs/MIGRATION.md §0); the
            # fleet file's cert_fingerprint is the operator's own word, so a grant bound
            # to a certificate alone would let anybody who edits the fleet file use it
            reasons.append(reason("grant.no_ssh_key",
                                  f"the grant binds admin {aid!r} only to a certificate (cert_sha256), "
                                  "which escort cannot prove the operator holds; only an SSH key is proven",
                                  "ask the owner for a grant naming the admin's SSH key "
                                  "(escort grant issue --admin-key-fp)"))
        else:
            try:
                ref = AdminRef(aid, normalize_ssh_fingerprint(ssh_key) if ssh_key else "",
                               normalize_fingerprint(cert) if cert else "")
            except InputError as exc:
                bad(f"the grant's admin key is unusable: {exc}")
    vms = payload.get("vms", [])
    uuids: set[str] = set()
    if not isinstance(vms, list) or not all(isinstance(v, str) for v in vms):
        bad("the grant's vms is not a list of UUIDs")
    else:
        for v in vms:
            try:
                uuids.add(normalize_uuid(v))
            except InputError:
                bad(f"the grant names {v!r}, which is not a VM UUID")
    label = payload.get("label", "")
    if not isinstance(label, str):
        bad("the grant's label is not a string")
        label = ""
    if not uuids and not label and not reasons:
        bad("the grant names no VM (vms) and no label")
    emergency = payload.get("emergency_only", False)
    if not isinstance(emergency, bool):
        bad("the grant's emergency_only is not true/false")
        emergency = False
    if reasons or ref is None:
        return None, reasons
    return Grant(
        admin=ref, vms=frozenset(uuids), label=label,
        not_before=dt.datetime.fromtimestamp(payload["nbf"], dt.UTC),
        not_after=dt.datetime.fromtimestamp(payload["exp"], dt.UTC),
        emergency_only=emergency, jti=str(payload["jti"]), owner=str(payload["iss"]),
    ), []


_BROKEN = {"grant.version", "grant.missing_field", "grant.malformed", "grant.unknown_field"}


@dataclass
class GrantBook:
    """Grant tokens verified once per token digest (signature, schema) and per ``at``."""

    owners: OwnerVerifier | None
    envelopes: EnvelopeVerifier = field(init=False)
    _bodies: dict[str, tuple[Grant | None, tuple[Reason, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.envelopes = EnvelopeVerifier(self.owners)

    def verify(self, token: str, at: dt.datetime, source: str = "") -> GrantResult:
        opened = self.envelopes.open(token, TYP_GRANT, GRANT_FIELDS)
        checked = self.envelopes.check(opened, at)
        reasons = list(checked.reasons)
        grant: Grant | None = None
        broken = any(r.code in _BROKEN for r in opened.reasons)
        if opened.payload is not None and not broken:
            body = self._bodies.get(opened.digest)
            if body is None:
                parsed, why = _parse_body(opened.payload)
                body = self._bodies[opened.digest] = (parsed, tuple(why))
            grant = body[0]
            reasons.extend(body[1])
        claimed = grant.admin.id if grant else _claimed_admin(token)
        return GrantResult(opened.digest, source, grant, checked.owner, tuple(reasons), claimed)


def _claimed_admin(token: str) -> str:
    try:
        _, payload = decode_unverified(token)
    except InputError:
        return ""
    admin = payload.get("admin")
    return str(admin.get("id", "")) if isinstance(admin, dict) else ""


def check_grant(
    result: GrantResult,
    *,
    admin: AdminRef,
    vm_uuid: str,
    vm_labels: Iterable[str] = (),
    policy_owner: OwnerIdentity | None,
    emergency: bool = False,
) -> list[Reason]:
    """Every reason ``result`` does not let ``admin`` move ``vm_uuid`` now ([] = it does)."""
    reasons = list(result.reasons)
    grant = result.grant
    if grant is None:
        return reasons or [reason("grant.malformed", "the grant is unusable", "issue it again")]
    who = result.owner.label() if result.owner else grant.owner
    if grant.admin.id != admin.id:
        reasons.append(reason("grant.wrong_admin",
                              f"the grant is for admin {grant.admin.id!r}, not {admin.id!r}",
                              f"ask the owner ({who}) for a grant naming {admin.id!r}"))
    else:
        if grant.admin.ssh_key and grant.admin.ssh_key != admin.ssh_key:
            have = admin.ssh_key or "no SSH key fingerprint in the fleet file"
            reasons.append(reason("grant.wrong_admin",
                                  f"the grant binds {admin.id!r} to SSH key {grant.admin.ssh_key}, "
                                  f"but the admin uses {have}",
                                  "use the key the grant names, or ask the owner for a grant for your key"))
        if grant.admin.cert_sha256 and grant.admin.cert_sha256 != admin.cert_sha256:
            reasons.append(reason("grant.wrong_admin",
                                  f"the grant binds {admin.id!r} to certificate "
                                  f"{grant.admin.cert_sha256[:16]}…, but the admin's certificate differs",
                                  "use the certificate the grant names, or ask the owner for a new grant"))
    vm = normalize_uuid(vm_uuid)
    labels = set(vm_labels)
    if vm not in grant.vms and not (grant.label and grant.label in labels):
        reasons.append(reason("grant.wrong_vm", f"the grant covers {grant.scope()}, not VM {vm}",
                              f"ask the owner ({who}) for a grant naming this VM"))
    if policy_owner is None:
        reasons.append(reason("grant.owner_mismatch",
                              "the VM has no valid owner policy, so no grant can be matched to its owner",
                              "attach a valid owner-signed policy to the VM first"))
    elif any(r.code == "grant.owner_untrusted" for r in reasons) and (
            result.owner is None or result.owner.label() == policy_owner.label()):
        # no owners' CA vouches for the signer now (revoked, expired, unknown CA): that reason
        # is already there; "signed by bob, but the VM belongs to bob" would only mislead
        pass
    elif result.owner is None or not policy_owner.same_owner(result.owner):
        # the same owner = the same owners' CA (by key) *and* the same e-mail/subject:
        # another owners' CA that also certifies "alice@..." is not Alice's CA
        signer = result.owner.full_label() if result.owner is not None else "an unknown signer"
        reasons.append(reason("grant.owner_mismatch",
                              f"the grant is signed by {signer}, but the VM belongs to "
                              f"{policy_owner.full_label()}",
                              f"ask {policy_owner.label()} (the VM's owner) for the grant, signed with "
                              f"a certificate from {policy_owner.issuer or 'their owners CA'}"))
    if grant.emergency_only and not emergency:
        reasons.append(reason("grant.emergency_only",
                              "the grant is for emergencies (evacuations) only",
                              "use it from an evacuation, or ask the owner for an ordinary grant"))
    return reasons


def authorise(
    results: Sequence[GrantResult],
    *,
    admin: AdminRef,
    vm_uuid: str,
    vm_labels: Iterable[str] = (),
    policy_owner: OwnerIdentity | None,
    emergency: bool = False,
) -> tuple[GrantResult | None, list[Reason]]:
    """The first grant that authorises ``admin`` for the VM, else every reason why none does.

    Only grants that (claim to) name this admin are reported, so one admin's
    explanation never lists every other admin's grants.
    """
    labels = tuple(vm_labels)
    candidates = [r for r in results if (r.grant.admin.id if r.grant else r.claimed_admin) == admin.id]
    reasons: list[Reason] = []
    for r in candidates:
        why = check_grant(r, admin=admin, vm_uuid=vm_uuid, vm_labels=labels, policy_owner=policy_owner,
                          emergency=emergency)
        if not why:
            return r, []
        for why_one in why:
            if why_one not in reasons:
                reasons.append(why_one)
    if not candidates:
        reasons.append(reason("grant.missing", f"no grant names admin {admin.id!r}",
                              "ask the VM's owner to issue a grant (`escort grant issue`) and add it "
                              "to the fleet file's grants"))
    return None, reasons


def build_grant_payload(
    *,
    owner: str,
    admin: AdminRef,
    vms: Sequence[str] = (),
    label: str = "",
    not_before: dt.datetime,
    not_after: dt.datetime,
    emergency_only: bool = False,
    jti: str | None = None,
) -> dict[str, Any]:
    """A grant payload, validated the way the verifier will see it."""
    if not admin.id:
        raise InputError("a grant needs the admin's id (--admin)")
    if not admin.ssh_key:
        raise InputError("a grant must bind the admin to their SSH key (--admin-key-fp); a certificate "
                         "fingerprint (--admin-cert-fp) alone proves nothing: escort proves admins "
                         "by SSH key")
    if not vms and not label:
        raise InputError("a grant must name VMs (--vm UUID) or a label (--label)")
    if not_after <= not_before:
        raise InputError("the grant's validity window is empty")
    admin_obj: dict[str, str] = {"id": admin.id}
    if admin.ssh_key:
        admin_obj["ssh_key"] = normalize_ssh_fingerprint(admin.ssh_key)
    if admin.cert_sha256:
        admin_obj["cert_sha256"] = normalize_fingerprint(admin.cert_sha256)
    payload: dict[str, Any] = {
        "ver": VERSION, "iss": owner, "jti": jti or str(uuidlib.uuid4()),
        "iat": int(not_before.timestamp()), "nbf": int(not_before.timestamp()),
        "exp": int(not_after.timestamp()), "admin": admin_obj,
    }
    if vms:
        payload["vms"] = sorted({normalize_uuid(v) for v in vms})
    if label:
        payload["label"] = label
    if emergency_only:
        payload["emergency_only"] = True
    return payload


def _body_reasons(payload: Mapping[str, Any]) -> list[Reason]:
    return _parse_body(payload)[1]


def sign_grant(payload: Mapping[str, Any], key: Any, chain: Sequence[Any]) -> str:
    """Sign ``payload``; refused (InputError) exactly when the verifier would refuse it."""
    return sign_envelope(payload, TYP_GRANT, key, chain, fields=GRANT_FIELDS, body=_body_reasons)


__all__ = [
    "AdminRef",
    "Grant",
    "GrantBook",
    "GrantResult",
    "authorise",
    "build_grant_payload",
    "check_grant",
    "normalize_ssh_fingerprint",
    "sign_grant",
]
