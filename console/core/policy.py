"""The owner-signed placement policy that travels with a VM.

A policy says, for one VM (its libvirt UUID): which CAs the owner trusts (by name
and SHA-256 fingerprint — trusting an intermediate admits only hosts under it) and
which host attributes are required (country, state, locality/site, organisation,
certificate policies). It is a JWS (see ``envelope``) stored in the domain XML's
``<metadata>`` under ``POLICY_NS`` so it moves with the VM.

``PolicyBook`` verifies each token once (cached by token digest) and hands out
``PolicyResult``s; the decision code never re-verifies per host.
"""

from __future__ import annotations

import datetime as dt
import marshal
import re
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .envelope import (
    TYP_HANDOVER,
    TYP_POLICY,
    VERSION,
    EnvelopeVerifier,
    Opened,
    OwnerIdentity,
    OwnerVerifier,
    reason,
)
from .envelope import sign as sign_envelope
from .errors import InputError
from .pki.model import DEFAULT_POLICY_NAMES
from .reasons import Reason
from .records import maker

POLICY_NS = "https://escort.dev/xmlns/policy/1"
POLICY_PREFIX = "escort"
POLICY_FIELDS = frozenset({"vm_uuid", "vm_name", "trusted_cas", "require", "labels", "seq", "handover"})
#: A hand-over: the VM's previous owner names the next one (see ``PolicyBook.continuity``).
HANDOVER_FIELDS = frozenset({"vm_uuid", "to", "to_ca"})
#: Largest sequence number (JSON integers are exact up to 2**53 in every language).
MAX_SEQ = 2**53
#: Requirement keys in the payload -> HostAttributes field they constrain.
REQUIRE_KEYS = {
    "country": "country",
    "state": "state",
    "locality": "locality",
    "org": "organization",
    "org_unit": "org_unit",
    "policies": "policies",
}
#: Friendlier spellings accepted on the command line.
REQUIRE_ALIASES = {"site": "locality", "policy": "policies", "o": "org", "ou": "org_unit",
                   "organization": "org", "c": "country", "st": "state", "l": "locality"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def normalize_fingerprint(text: str) -> str:
    """``SHA256:AB:CD..`` / ``ab cd ..`` / ``abcd..`` -> 64 lowercase hex digits, or InputError."""
    t = text.strip().lower()
    for prefix in ("sha256:", "sha-256:", "sha256="):
        if t.startswith(prefix):
            t = t[len(prefix):]
    t = t.replace(":", "").replace(" ", "")
    if not _HEX64.match(t):
        raise InputError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return t


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def normalize_uuid(text: str) -> str:
    """Any UUID spelling -> the canonical lowercase form libvirt prints; InputError otherwise."""
    if isinstance(text, str) and _UUID.match(text):
        return text
    try:
        return str(uuidlib.UUID(text.strip()))
    except (ValueError, AttributeError) as exc:
        raise InputError(f"{text!r} is not a UUID") from exc


@dataclass(frozen=True)
class TrustedCA:
    name: str
    fingerprint: str  # lowercase hex SHA-256


@dataclass(frozen=True)
class Requirements:
    """Required host attributes; an empty set means "any". ``policies`` are all required.

    Frozen and hashable on purpose: VMs whose policies have identical requirements
    share one row of the allowed-target matrix.
    """

    trusted_cas: frozenset[str] = frozenset()  # fingerprints
    country: frozenset[str] = frozenset()
    state: frozenset[str] = frozenset()
    locality: frozenset[str] = frozenset()
    org: frozenset[str] = frozenset()
    org_unit: frozenset[str] = frozenset()
    policies: frozenset[str] = frozenset()  # names or OIDs as written by the owner

    def __hash__(self) -> int:
        """The dataclass's hash (of the fields, in order), computed once per object: every VM's
        matrix row and summary look their requirements up (~1 us each in Python otherwise).
        The value is kept out of pickles (``__getstate__``): a hash of strings is only valid
        in the process that computed it."""
        h: int | None = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.trusted_cas, self.country, self.state, self.locality, self.org, self.org_unit,
                      self.policies))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_hash", None)
        return state

    def as_payload(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key in REQUIRE_KEYS:
            values = getattr(self, key)
            if values:
                out[key] = sorted(values)
        return out


@dataclass(frozen=True)
class PlacementPolicy:
    vm_uuid: str
    vm_name: str
    owner: str  # iss
    trusted_cas: tuple[TrustedCA, ...]
    requirements: Requirements
    not_before: dt.datetime
    not_after: dt.datetime
    jti: str
    labels: tuple[str, ...] = ()
    seq: int = 0  # monotonic per VM: an older one than already seen is a rollback
    handover: str = ""  # the previous owner's signed hand-over (compact JWS), "" when none

    def summary(self) -> str:
        """One line for the VM's row: how many CAs it trusts and what it requires. It depends
        on those two only, so it is made once per distinct pair (a fleet's 10,000 policies
        share a few hundred: ``_SUMMARIES``), not per VM and row."""
        key = (len(self.trusted_cas), self.requirements)
        hit = _SUMMARIES.get(key)
        if hit is None:
            parts = [f"{key[0]} CA(s)"]
            for name in REQUIRE_KEYS:
                values = getattr(self.requirements, name)
                if values:
                    sep = "+" if name == "policies" else "|"
                    parts.append(f"{name} {sep.join(sorted(values))}")
            hit = ", ".join(parts)
            if len(_SUMMARIES) >= _MAX_SHAPES:
                _SUMMARIES.clear()
            _SUMMARIES[key] = hit
        return hit

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ver": VERSION,
            "iss": self.owner,
            "jti": self.jti,
            "nbf": int(self.not_before.timestamp()),
            "exp": int(self.not_after.timestamp()),
            "vm_uuid": self.vm_uuid,
            "vm_name": self.vm_name,
            "trusted_cas": [{"name": c.name, "sha256": c.fingerprint} for c in self.trusted_cas],
            "require": self.requirements.as_payload(),
        }
        if self.labels:
            out["labels"] = list(self.labels)
        if self.seq:
            out["seq"] = self.seq
        if self.handover:
            out["handover"] = self.handover
        return out


@dataclass(frozen=True)
class SeenPolicy:
    """What escort remembers about a VM's newest policy (the state adapter stores it)."""

    owner: str  # OwnerIdentity.key: issuing owners' CA key + e-mail/subject
    owner_label: str  # for messages
    seq: int
    digest: str


def merge_seen(*layers: Mapping[str, SeenPolicy]) -> dict[str, SeenPolicy]:
    """The newest entry per VM over several memories: a higher ``seq`` wins, on a tie the
    earlier layer stays (the same rule as escort's own memory, adapters/state.py)."""
    out: dict[str, SeenPolicy] = {}
    for layer in layers:
        for uuid, new in layer.items():
            old = out.get(uuid)
            if old is None or new.seq > old.seq:
                out[uuid] = new
    return out


@dataclass(frozen=True)
class PolicyResult:
    """A policy after verification for one VM at one time."""

    digest: str  # sha256 of the token, "" when there is none
    policy: PlacementPolicy | None  # None when the token is unusable
    owner: OwnerIdentity | None
    reasons: tuple[Reason, ...] = ()
    warnings: tuple[Reason, ...] = ()

    @property
    def valid(self) -> bool:
        return self.policy is not None and not self.reasons

    def seen_entry(self) -> SeenPolicy | None:
        """What is remembered of this policy once accepted; None when it is not valid."""
        if not self.valid or self.owner is None or self.policy is None:
            return None
        return SeenPolicy(self.owner.key, self.owner.full_label(), self.policy.seq, self.digest)


_make_policy = maker(PlacementPolicy)
_make_result = maker(PolicyResult)

#: (number of trusted CAs, requirements) -> ``PlacementPolicy.summary``'s line
_SUMMARIES: dict[tuple[int, Requirements], str] = {}

#: (trusted_cas, require) as canonical JSON -> parsed result. Many VMs share a policy's
#: shape, so parsing and hashing it once per shape also makes equal Requirements the
#: *same* object, which keeps grouping in the matrix cheap.
_SHAPES: dict[bytes | str, tuple[tuple[TrustedCA, ...], Requirements | None, tuple[Reason, ...]]] = {}
_MAX_SHAPES = 65536


def _shape_key(raw_cas: Any, req: Any) -> bytes | str:
    """An exact key for a policy's (trusted_cas, require) as parsed from JSON: ``marshal``'s
    bytes, ~3x cheaper than ``repr``. marshal writes every value with its type (a bool is
    not written as the int 1, nor 1.0 as 1) and its bytes load back as the value, so equal
    bytes are equal values of the same types; equal shapes written differently (key order,
    an interned string) merely miss. Format 2: no back-references, so the bytes do not
    depend on how many references a string has elsewhere. Anything marshal cannot write
    (never from JSON) is keyed by ``repr`` as before."""
    try:
        return marshal.dumps((raw_cas, req), 2)
    except ValueError:
        return repr((raw_cas, req))


def _parse_shape(raw_cas: Any, req: Any) -> tuple[tuple[TrustedCA, ...], Requirements | None,
                                                   tuple[Reason, ...]]:
    key = _shape_key(raw_cas, req)
    hit = _SHAPES.get(key)
    if hit is not None:
        return hit
    reasons: list[Reason] = []

    def bad(message: str) -> None:
        reasons.append(reason("policy.malformed", message, "re-sign the policy with `escort policy sign`"))

    cas: list[TrustedCA] = []
    if not isinstance(raw_cas, list) or not raw_cas:
        bad("the policy trusts no CA (trusted_cas is missing or empty)")
    else:
        for i, entry in enumerate(raw_cas):
            extra = set(entry) - {"name", "sha256"} if isinstance(entry, dict) else set()
            if extra:
                reasons.append(reason("policy.unknown_field",
                                      f"entry {i + 1} of trusted_cas has unknown field(s) "
                                      f"{', '.join(sorted(extra))}",
                                      "re-sign the policy with `escort policy sign`"))
                continue
            if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                    or not isinstance(entry.get("name", ""), str)):
                bad(f"entry {i + 1} of trusted_cas is not {{name, sha256}} (strings)")
                continue
            try:
                fp = normalize_fingerprint(entry["sha256"])
            except InputError:
                bad(f"entry {i + 1} of trusted_cas has no SHA-256 fingerprint")
                continue
            cas.append(TrustedCA(entry.get("name") or fp[:16], fp))
    sets: dict[str, frozenset[str]] = {}
    if not isinstance(req, dict):
        bad("the policy's require is not a table")
        req = {}
    unknown = sorted(set(req) - set(REQUIRE_KEYS))
    if unknown:
        reasons.append(reason("policy.unknown_field", f"the policy requires unknown attribute(s) "
                              f"{', '.join(unknown)}", "re-sign the policy with `escort policy sign`"))
    for k in REQUIRE_KEYS:
        values = req.get(k, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            bad(f"the policy's require.{k} is not a list of strings")
            values = []
        elif k in req and not values:
            # an empty list must not read as "no requirement": that would admit everything
            reasons.append(reason("policy.empty_requirement",
                                  f"the policy's require.{k} is an empty list, which would admit "
                                  f"any {k}",
                                  f"re-sign the policy listing the allowed {k} values, or without "
                                  f"require.{k} to admit any"))
        sets[k] = frozenset(values)
    fps = frozenset(c.fingerprint for c in cas)
    requirements = None if reasons else Requirements(trusted_cas=fps, **sets)
    result = (tuple(cas), requirements, tuple(reasons))
    if len(_SHAPES) >= _MAX_SHAPES:
        _SHAPES.clear()
    _SHAPES[key] = result
    return result


#: seconds since 1970 -> that instant as an aware UTC datetime (a fleet's policies share a
#: few validity windows; the datetime is immutable and the same for the same int)
_DATES: dict[int, dt.datetime] = {}


def _utc(seconds: int) -> dt.datetime:
    if type(seconds) is not int:  # (exact ints only: True == 1 would share 1's entry)
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    hit = _DATES.get(seconds)
    if hit is None:
        if len(_DATES) >= _MAX_SHAPES:
            _DATES.clear()
        hit = _DATES[seconds] = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return hit


_IS_STR = str.__instancecheck__  # isinstance(v, str), for map()


_Shape = tuple[tuple[TrustedCA, ...], Requirements | None, tuple[Reason, ...]]


def _parse_body(payload: Mapping[str, Any], shape: _Shape | None = None
                ) -> tuple[PlacementPolicy | None, list[Reason]]:
    """The policy's own fields -> PlacementPolicy, or reasons (common claims are checked already).

    A policy whose fields are all of the plain types a good one has is made here; anything
    else goes through every check with its reasons (``_parse_body_checked``), which would
    make the very same policy of this one. ``shape``: ``_parse_shape`` of this very payload's
    trusted_cas and require, when the caller has it already (``PolicyBook.adopt_packed``)."""
    get = payload.get
    vm_uuid, vm_name, labels, seq, handover = (get("vm_uuid"), get("vm_name", ""), get("labels", []),
                                               get("seq", 0), get("handover", ""))
    if (type(vm_uuid) is str and _UUID.match(vm_uuid) is not None and type(vm_name) is str
            and type(labels) is list and all(map(_IS_STR, labels))
            and type(seq) is int and 0 <= seq <= MAX_SEQ
            and type(handover) is str and ("handover" not in payload or _JWS_SHAPE.match(handover))):
        cas, requirements, shape_reasons = (shape if shape is not None
                                            else _parse_shape(get("trusted_cas"), get("require", {})))
        if requirements is not None and not shape_reasons:
            iss, jti = payload["iss"], payload["jti"]
            return _make_policy(vm_uuid, vm_name, iss if type(iss) is str else str(iss), cas, requirements,
                                _utc(payload["nbf"]), _utc(payload["exp"]),
                                jti if type(jti) is str else str(jti), tuple(labels), seq, handover), []
    return _parse_body_checked(payload)


def _parse_body_checked(payload: Mapping[str, Any]) -> tuple[PlacementPolicy | None, list[Reason]]:
    """``_parse_body`` with every check and its reason."""
    reasons: list[Reason] = []

    def bad(message: str) -> None:
        reasons.append(reason("policy.malformed", message, "re-sign the policy with `escort policy sign`"))

    vm_uuid = payload.get("vm_uuid")
    try:
        vm_uuid = normalize_uuid(vm_uuid) if isinstance(vm_uuid, str) else None
    except InputError:
        vm_uuid = None
    if vm_uuid is None:
        bad("the policy's vm_uuid is missing or not a UUID")
    vm_name = payload.get("vm_name", "")
    if not isinstance(vm_name, str):
        bad("the policy's vm_name is not a string")
        vm_name = ""
    cas, requirements, shape_reasons = _parse_shape(payload.get("trusted_cas"), payload.get("require", {}))
    reasons.extend(shape_reasons)
    labels = payload.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        bad("the policy's labels are not a list of strings")
        labels = []
    seq = payload.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        bad(f"the policy's seq is not a whole number between 0 and {MAX_SEQ}")
        seq = 0
    handover = payload.get("handover", "")
    if not isinstance(handover, str) or ("handover" in payload and not _JWS_SHAPE.match(handover)):
        bad("the policy's handover is not a compact JWS (from `escort policy handover`)")
        handover = ""
    if reasons or vm_uuid is None or requirements is None:
        return None, reasons
    policy = PlacementPolicy(
        vm_uuid=vm_uuid,
        vm_name=vm_name,
        owner=str(payload["iss"]),
        trusted_cas=cas,
        requirements=requirements,
        not_before=_utc(payload["nbf"]),
        not_after=_utc(payload["exp"]),
        jti=str(payload["jti"]),
        labels=tuple(labels),
        seq=seq,
        handover=handover,
    )
    return policy, reasons


_JWS_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


@dataclass
class PolicyBook:
    """Verifies policies once per token and remembers them.

    The signature and schema check is cached by token digest; the time checks and
    the owner chain (shared by every policy of one owner) are cached per ``at`` by the
    envelope verifier. ``verify_many`` is the bulk path the matrix uses.
    """

    owners: OwnerVerifier | None
    #: VM UUID -> the newest policy escort has accepted for it before (from the state
    #: adapter; empty = nothing remembered). The core never reads or writes state itself.
    seen: Mapping[str, SeenPolicy] = field(default_factory=dict)
    envelopes: EnvelopeVerifier = field(init=False)
    _bodies: dict[str, tuple[PlacementPolicy | None, tuple[Reason, ...]]] = field(default_factory=dict)
    #: (token digest, VM UUID) -> the last result and the time it was computed for
    _results: dict[tuple[str, str | None], tuple[dt.datetime, PolicyResult]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.envelopes = EnvelopeVerifier(self.owners)

    def verify(self, token: str, at: dt.datetime, *, vm_uuid: str | None = None) -> PolicyResult:
        """Verify ``token`` at ``at``; ``vm_uuid`` is the VM it is attached to (if known).

        With a ``vm_uuid`` the policy is also checked against what was seen before for
        that VM (``seen``): no rollback, no change of owner without a hand-over.
        """
        return self.verify_opened(self.envelopes.open(token, TYP_POLICY, POLICY_FIELDS), at,
                                  vm_uuid=vm_uuid)

    def verify_opened(self, opened: Opened, at: dt.datetime, *, vm_uuid: str | None = None) -> PolicyResult:
        """``verify`` for a token already opened by ``envelopes`` (the caller holds it)."""
        key = (opened.digest, vm_uuid)
        hit = self._results.get(key)
        if hit is not None and hit[0] == at:
            result = hit[1]
        else:
            result = self._verify(opened, at, vm_uuid)
            self._results[key] = (at, result)
        if vm_uuid is not None and self.seen:
            seen = self.seen.get(vm_uuid) or self.seen.get(vm_uuid.lower())
            if seen is not None and seen.digest != result.digest:  # (the same policy: nothing to say)
                more = self.continuity(result, seen, at, vm_uuid)
                if more:
                    result = replace(result, reasons=result.reasons + tuple(more))
        return result

    def continuity(self, result: PolicyResult, seen: SeenPolicy, at: dt.datetime,
                   vm_uuid: str) -> list[Reason]:
        """Why ``result`` may not replace the policy already seen for the VM ([] = it may).

        * same owner: its ``seq`` must not be lower than the one seen (``policy.rollback``);
        * another owner: refused (``policy.owner_changed``) unless the policy carries a
          hand-over signed by the owner seen before, for this VM, naming the new owner
          (its owners' CA key and e-mail/subject), valid now (``policy.handover_invalid``
          says what is wrong with it) — and its ``seq`` is higher than the one seen.
        """
        pol, owner = result.policy, result.owner
        if pol is None or owner is None or not owner.key:
            return []  # unusable anyway; its own reasons say why
        if result.digest == seen.digest:
            return []
        who = owner.full_label()
        if owner.key == seen.owner:
            if pol.seq < seen.seq:
                return [reason("policy.rollback",
                               f"the policy has sequence number {pol.seq}, but escort has already seen "
                               f"sequence {seen.seq} for this VM: it is an older policy replayed",
                               f"attach the newest policy {who} signed for this VM")]
            return []  # an equal seq is the same policy re-signed (signatures differ each time)
        if not pol.handover:
            return [reason("policy.owner_changed",
                           f"the policy is signed by {who}, but this VM's policies so far were signed by "
                           f"{seen.owner_label}",
                           f"ask {seen.owner_label} to hand the VM over (`escort policy handover`), "
                           "then sign the new policy with --handover")]
        problems = self._handover_problems(pol, owner, seen, at, vm_uuid)
        if problems:
            return [reason("policy.handover_invalid",
                           f"the policy from {who} carries a hand-over that does not count: {problems}",
                           f"ask {seen.owner_label} for a new hand-over to this owner for this VM")]
        if pol.seq <= seen.seq:
            return [reason("policy.rollback",
                           f"the handed-over policy has sequence number {pol.seq}, not above the "
                           f"{seen.seq} already seen for this VM",
                           "sign the new policy with a higher --seq")]
        return []

    def _handover_problems(self, pol: PlacementPolicy, owner: OwnerIdentity, seen: SeenPolicy,
                           at: dt.datetime, vm_uuid: str) -> str:
        checked = self.envelopes.verify(pol.handover, TYP_HANDOVER, HANDOVER_FIELDS, at)
        if not checked.valid or checked.payload is None:
            return "; ".join(r.message.rstrip(".") for r in checked.reasons) or "it is unusable"
        out: list[str] = []
        signer = checked.owner
        if signer is None or signer.key != seen.owner:
            out.append(f"it is signed by {signer.full_label() if signer else 'nobody'}, "
                       f"not by {seen.owner_label}")
        hv = checked.payload.get("vm_uuid")
        try:
            hv_uuid = normalize_uuid(hv) if isinstance(hv, str) else ""
        except InputError:
            hv_uuid = ""
        if hv_uuid != normalize_uuid(vm_uuid):
            out.append(f"it is for VM {hv!r}, not this one")
        to, to_ca = checked.payload.get("to"), checked.payload.get("to_ca")
        names = {owner.email.lower(), owner.subject} - {""}
        if not isinstance(to, str) or to.lower() not in {n.lower() for n in names}:
            out.append(f"it names {to!r} as the new owner, not {owner.label()}")
        if not isinstance(to_ca, str) or to_ca.lower() != owner.issuer_key:
            out.append(f"it names another owners' CA than {owner.issuer or 'the signer'}'s")
        return "; ".join(out)

    def _verify(self, opened: Opened, at: dt.datetime, vm_uuid: str | None) -> PolicyResult:
        checked, warnings, _chain, owner = self.envelopes.check_parts(opened, at)
        reasons = list(checked)
        policy: PlacementPolicy | None = None
        broken = bool(opened.reasons) and _claims_broken(opened.reasons)
        if opened.payload is not None:
            body = self._body(opened, broken)
            policy = body[0]
            reasons.extend(body[1])
        if (policy is not None and vm_uuid is not None and vm_uuid != policy.vm_uuid
                and normalize_uuid(vm_uuid) != policy.vm_uuid):
            reasons.append(reason(
                "policy.vm_mismatch",
                f"the policy is for VM {policy.vm_uuid} ({policy.vm_name or 'unnamed'}), "
                f"not this VM ({vm_uuid})",
                "attach the policy the owner signed for this VM's UUID"))
        if opened.payload is None or broken:
            policy = None
        return _make_result(opened.digest, policy, owner, tuple(reasons), warnings)

    def _body(self, opened: Opened, broken: bool, shape: _Shape | None = None
              ) -> tuple[PlacementPolicy | None, tuple[Reason, ...]]:
        """The policy body of ``opened`` (which has a payload) and its reasons, parsed once per
        digest; none when its common claims are ``broken``. ``shape``: as for ``_parse_body``."""
        body = self._bodies.get(opened.digest)
        if body is None:
            payload = opened.payload
            parsed, why = (None, []) if broken or payload is None else _parse_body(payload, shape)
            body = self._bodies[opened.digest] = (parsed, tuple(why))
        return body

    def adopt_packed(self, packed: bytes, tokens: Mapping[str, str]) -> int:
        """``envelopes.adopt_packed`` for policies (a chunk the start-up helper opened), and each
        adopted policy's body parsed here at once, as ``_verify`` would parse it: the shape
        (trusted_cas, require) once per distinct pair of objects in the chunk (the pack
        shares equal values), every other field per policy. Returns how many were adopted."""
        adopted: list[Opened] = []
        n = self.envelopes.adopt_packed(packed, TYP_POLICY, tokens, adopted)
        bodies = self._bodies
        # (id(trusted_cas), id(require)) -> the objects and their parse: the objects are held
        # here while this runs, so an id means the same object (nothing mutates a payload)
        shapes: dict[tuple[int, int], tuple[object, object, _Shape]] = {}
        for opened in adopted:
            payload = opened.payload
            if payload is None or opened.digest in bodies:
                continue
            if opened.reasons and _claims_broken(opened.reasons):
                self._body(opened, True)
                continue
            raw_cas, req = payload.get("trusted_cas"), payload.get("require", {})
            key = (id(raw_cas), id(req))
            hit = shapes.get(key)
            if hit is None or hit[0] is not raw_cas or hit[1] is not req:
                hit = shapes[key] = (raw_cas, req, _parse_shape(raw_cas, req))
            self._body(opened, False, hit[2])
        return n

    def verify_many(self, items: Iterable[tuple[str, str]], at: dt.datetime) -> dict[str, PolicyResult]:
        """``(vm_uuid, token)`` pairs -> results by VM UUID; each distinct token verified once."""
        return {u: self.verify(t, at, vm_uuid=u) for u, t in items}


def _claims_broken(reasons: Sequence[Reason]) -> bool:
    """Claim problems that make the payload meaningless (version, missing claims, malformed)."""
    return any(r.code in _BROKEN for r in reasons)


_BROKEN = frozenset({"policy.version", "policy.missing_field", "policy.malformed",
                     "policy.unknown_field", "policy.empty_requirement"})


def verify_policy(token: str, owners: OwnerVerifier | None, at: dt.datetime, *,
                  vm_uuid: str | None = None) -> PolicyResult:
    """One-off verification (no shared cache): what a per-pair evaluation would do."""
    return PolicyBook(owners).verify(token, at, vm_uuid=vm_uuid)


def parse_requirements(items: Iterable[str]) -> dict[str, list[str]]:
    """``country=DE,FR`` / ``policy=assurance:high`` (repeatable) -> the payload's ``require``."""
    out: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lower()
        key = REQUIRE_ALIASES.get(key, key)
        if not sep or key not in REQUIRE_KEYS:
            raise InputError(f"--require {item!r}: expected KEY=V1,V2 with KEY one of "
                             f"{', '.join(sorted(set(REQUIRE_KEYS) | set(REQUIRE_ALIASES)))}")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise InputError(f"--require {item!r}: no values after '='")
        if key == "country":
            vals = [v.upper() for v in vals]
        out.setdefault(key, set()).update(vals)
    return {k: sorted(v) for k, v in out.items()}


def build_policy_payload(
    *,
    owner: str,
    vm_uuid: str,
    vm_name: str,
    trusted_cas: Sequence[tuple[str, str]],
    require: Mapping[str, Sequence[str]],
    not_before: dt.datetime,
    not_after: dt.datetime,
    jti: str | None = None,
    labels: Sequence[str] = (),
    seq: int | None = None,
    handover: str = "",
) -> dict[str, Any]:
    """A policy payload, validated the way the verifier will see it.

    ``seq`` defaults to ``not_before`` in seconds since 1970, so a policy signed later
    outranks an earlier one without the owner having to count.
    """
    if not trusted_cas:
        raise InputError("a policy must trust at least one CA (--trust-ca NAME=SHA256)")
    if not_after <= not_before:
        raise InputError("the policy's validity window is empty")
    unknown = set(require) - set(REQUIRE_KEYS)
    if unknown:
        raise InputError(f"unknown requirement(s) {', '.join(sorted(unknown))}")
    empty = sorted(k for k, v in require.items() if not v)
    if empty:
        raise InputError(f"requirement {empty[0]} has no values (leave it out to admit any {empty[0]})")
    payload: dict[str, Any] = {
        "ver": VERSION,
        "iss": owner,
        "jti": jti or str(uuidlib.uuid4()),
        "iat": int(not_before.timestamp()),
        "nbf": int(not_before.timestamp()),
        "exp": int(not_after.timestamp()),
        "vm_uuid": normalize_uuid(vm_uuid),
        "vm_name": vm_name,
        "trusted_cas": [{"name": n, "sha256": normalize_fingerprint(fp)} for n, fp in trusted_cas],
        "require": {k: sorted(set(v)) for k, v in require.items()},
    }
    if labels:
        payload["labels"] = sorted(set(labels))
    payload["seq"] = int(not_before.timestamp()) if seq is None else seq
    if not isinstance(payload["seq"], int) or not 0 <= payload["seq"] <= MAX_SEQ:
        raise InputError(f"--seq must be a whole number between 0 and {MAX_SEQ}")
    if handover:
        payload["handover"] = handover.strip()
    return payload


def _body_reasons(payload: Mapping[str, Any]) -> list[Reason]:
    return _parse_body(payload)[1]


def build_handover_payload(*, owner: str, vm_uuid: str, to: str, to_ca: str, not_before: dt.datetime,
                           not_after: dt.datetime, jti: str | None = None) -> dict[str, Any]:
    """A hand-over of one VM from ``owner`` (the signer) to the owner ``to`` (e-mail, else
    subject) certified by the owners' CA whose key has SHA-256 ``to_ca``."""
    if not to.strip():
        raise InputError("a hand-over must name the new owner (their certificate's e-mail or subject)")
    if not re.fullmatch(r"[0-9a-f]{64}", to_ca):
        raise InputError("a hand-over must name the new owner's CA by the SHA-256 of its key")
    if not_after <= not_before:
        raise InputError("the hand-over's validity window is empty")
    return {"ver": VERSION, "iss": owner, "jti": jti or str(uuidlib.uuid4()),
            "iat": int(not_before.timestamp()), "nbf": int(not_before.timestamp()),
            "exp": int(not_after.timestamp()), "vm_uuid": normalize_uuid(vm_uuid), "to": to, "to_ca": to_ca}


def _handover_body(payload: Mapping[str, Any]) -> list[Reason]:
    out: list[Reason] = []
    vm = payload.get("vm_uuid")
    try:
        ok = isinstance(vm, str) and bool(normalize_uuid(vm))
    except InputError:
        ok = False
    if not ok:
        out.append(reason("handover.malformed", "the hand-over's vm_uuid is not a UUID"))
    if not isinstance(payload.get("to"), str) or not payload.get("to"):
        out.append(reason("handover.malformed", "the hand-over names no new owner (to)"))
    to_ca = payload.get("to_ca")
    if not isinstance(to_ca, str) or not re.fullmatch(r"[0-9a-f]{64}", to_ca):
        out.append(reason("handover.malformed", "the hand-over's to_ca is not a SHA-256 (64 hex digits)"))
    return out


def sign_handover(payload: Mapping[str, Any], key: Any, chain: Sequence[Any]) -> str:
    return sign_envelope(payload, TYP_HANDOVER, key, chain, fields=HANDOVER_FIELDS, body=_handover_body)


def sign_policy(payload: Mapping[str, Any], key: Any, chain: Sequence[Any]) -> str:
    """Sign ``payload``; refused (InputError) exactly when the verifier would refuse it."""
    return sign_envelope(payload, TYP_POLICY, key, chain, fields=POLICY_FIELDS, body=_body_reasons)


def resolve_policy_names(names: Iterable[str], table: Mapping[str, str] | None = None) -> frozenset[str]:
    """Friendly certificate-policy names -> dotted OIDs (unknown names stay as written).

    Host attributes and requirements are both mapped through this so that
    ``assurance:high`` in a policy matches the OID in a certificate and vice versa.
    """
    if not table:
        return frozenset(DEFAULT_POLICY_NAMES.get(n, n) for n in names)
    merged = {**DEFAULT_POLICY_NAMES, **table}
    return frozenset(merged.get(n, n) for n in names)


# --- libvirt <metadata> ------------------------------------------------------------

def policy_metadata_xml(token: str) -> str:
    """The element handed to virDomainSetMetadata(ELEMENT, xml, "escort", POLICY_NS)."""
    token = token.strip()
    if not token or not re.fullmatch(r"[A-Za-z0-9_\-.]+", token):
        raise InputError("a policy token is base64url text separated by dots")
    import xml.etree.ElementTree as ET  # only here: a decision never needs XML

    ET.register_namespace(POLICY_PREFIX, POLICY_NS)
    elem = ET.Element(f"{{{POLICY_NS}}}policy", {"ver": str(VERSION)})
    elem.text = token
    return ET.tostring(elem, encoding="unicode")


#: A domain XML is a few KiB (escort's metadata element well under one); 1 MiB bounds the parse.
MAX_METADATA_CHARS = 1024 * 1024


def token_from_metadata_xml(xml: str) -> str:
    """The policy token from our metadata element or from a whole domain XML.

    Returns "" when a domain XML carries no escort policy. DTDs and entities are
    refused outright: we never need them, and refusing them closes the door on
    entity-expansion tricks without a second parser.
    """
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise InputError("metadata XML with a DTD or entities is refused")
    if len(xml) > MAX_METADATA_CHARS:
        raise InputError(f"metadata XML is larger than {MAX_METADATA_CHARS // 1024} KiB")
    import xml.etree.ElementTree as ET  # only here: a decision never needs XML

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"metadata XML is not well-formed ({exc})") from exc
    except (ValueError, UnicodeError) as exc:  # e.g. a lone surrogate: not text at all
        raise InputError("metadata XML is not well-formed (not Unicode text)") from exc
    tag = f"{{{POLICY_NS}}}policy"
    if root.tag == tag:
        elem = root
    elif root.tag == "domain":
        found = root.find(f"./metadata/{tag}")
        if found is None:
            return ""
        elem = found
    else:
        raise InputError(f"metadata XML is neither an escort policy element nor a domain ({root.tag})")
    if len(elem):
        raise InputError("the escort policy element must contain only the token")
    return (elem.text or "").strip()


__all__ = [
    "HANDOVER_FIELDS",
    "POLICY_FIELDS",
    "POLICY_NS",
    "REQUIRE_KEYS",
    "PlacementPolicy",
    "PolicyBook",
    "PolicyResult",
    "Requirements",
    "SeenPolicy",
    "TrustedCA",
    "build_handover_payload",
    "build_policy_payload",
    "normalize_fingerprint",
    "normalize_uuid",
    "parse_requirements",
    "policy_metadata_xml",
    "resolve_policy_names",
    "sign_handover",
    "sign_policy",
    "token_from_metadata_xml",
    "verify_policy",
]
