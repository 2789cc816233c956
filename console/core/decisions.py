"""May admin A move VM V to host H at time T — and if not, exactly why not?

``decide`` answers for one (VM, host, admin, time) and reports *every* failing
check as a ``Reason``, plus an ordered walkthrough (``Step``s: owner's policy ->
trusted CA -> intermediate -> host certificate -> attributes -> grant -> host ->
verdict) that reads like a lesson in how the trust chain works.

``allowed_matrix`` is the fast path for the whole fleet. Its inputs are already
verified once (each host chain once, each policy once — see ``PolicyBook``); what
remains per VM is set algebra. Hosts become bits in an int; the trusted CAs and
every attribute value get a bitmask of hosts once; VMs whose policies have the same
``Requirements`` share one mask. A fleet of 10,000 VMs x 1,000 hosts is then a few
thousand big-int ANDs/ORs instead of ten million comparisons. ``allowed_per_pair``
is the straightforward path (``decide`` for every pair); a test asserts both agree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .envelope import reason, sentence
from .grants import AdminRef, GrantResult, authorise
from .pki import ChainResult, HostAttributes
from .policy import PolicyResult, Requirements, resolve_policy_names
from .reasons import Reason
from .records import maker

Reachability = Literal["unknown", "up", "down"]

#: Requirement key -> (HostAttributes field, words used in sentences)
_ATTRS: tuple[tuple[str, str, str], ...] = (
    ("country", "country", "country"),
    ("state", "state", "state/province"),
    ("locality", "locality", "site (locality)"),
    ("org", "organization", "organisation"),
    ("org_unit", "org_unit", "organisational unit"),
)


@dataclass(frozen=True)
class Step:
    """One line of the walkthrough; ``ok`` is None for steps that are informational or skipped."""

    title: str
    ok: bool | None
    detail: str
    reasons: tuple[Reason, ...] = ()  # the failures this step found (also in Decision.reasons)

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "ok": self.ok, "detail": self.detail,
                "reasons": [r.code for r in self.reasons]}


@dataclass(frozen=True)
class Decision:
    vm: str
    host: str
    admin: str | None
    at: dt.datetime
    allowed: bool
    reasons: tuple[Reason, ...]  # errors first, then warnings
    steps: tuple[Step, ...]
    # For the audit log (not in the JSON contract): what the decision rested on.
    vm_uuid: str = ""
    policy_digest: str = ""  # sha256 of the policy token, "" when there was none
    grant_digest: str = ""  # sha256 of the grant that authorised the admin, "" when none

    def as_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "host": self.host,
            "admin": self.admin,
            "at": self.at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            "allowed": self.allowed,
            "reasons": [r.as_json() for r in self.reasons],
            "steps": [s.as_json() for s in self.steps],
        }


@dataclass(frozen=True)
class HostCheck:
    """A host as the decision needs it: its chain result (checked once) and attributes."""

    name: str
    chain: ChainResult | None  # None: no certificate known for the host
    attributes: HostAttributes | None
    reachability: Reachability = "unknown"
    problem: Reason | None = None  # unreadable certificate, unreachable, ...
    policy_oids: frozenset[str] = frozenset()  # host certificate policies, as OIDs

    @classmethod
    def prepare(
        cls,
        name: str,
        chain: ChainResult | None,
        attributes: HostAttributes | None,
        *,
        reachability: Reachability = "unknown",
        problem: Reason | None = None,
        policy_names: Mapping[str, str] | None = None,
    ) -> HostCheck:
        oids = resolve_policy_names(attributes.policies, policy_names) if attributes else frozenset()
        if chain is not None and chain.policies is not None:
            # RFC 5280 policy processing: a placement OID counts only when every CA on
            # the host's path asserts it (or anyPolicy); see ChainResult.policies.
            oids = oids & chain.policies
        return cls(name, chain, attributes, reachability, problem, oids)

    @property
    def eligible(self) -> bool:
        """Whether the host can be a target at all, whatever the VM."""
        return (self.chain is not None and self.chain.valid and self.attributes is not None
                and self.reachability != "down" and self.problem is None)


_DEFAULT_OIDS: dict[frozenset[str], frozenset[str]] = {}


@dataclass(frozen=True)
class VMCheck:
    uuid: str
    name: str
    current_host: str
    policy: PolicyResult
    policy_oids: frozenset[str] = frozenset()

    @classmethod
    def prepare(cls, uuid: str, name: str, current_host: str, policy: PolicyResult,
                policy_names: Mapping[str, str] | None = None) -> VMCheck:
        req = policy.policy.requirements.policies if policy.policy else frozenset()
        if not req:
            oids: frozenset[str] = frozenset()
        elif policy_names:
            oids = resolve_policy_names(req, policy_names)
        else:  # the common case, cached: many VMs require the same policies
            hit = _DEFAULT_OIDS.get(req)
            if hit is None:
                if len(_DEFAULT_OIDS) > 4096:
                    _DEFAULT_OIDS.clear()
                hit = _DEFAULT_OIDS[req] = resolve_policy_names(req)
            oids = hit
        return _make_check(uuid, name, current_host, policy, oids)

    @property
    def label(self) -> str:
        return self.name or self.uuid


_make_check = maker(VMCheck)


def _join(values: Iterable[str]) -> str:
    items = sorted(values)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _attribute_reasons(vm: VMCheck, host: HostCheck, req: Requirements, owner: str,
                       policy_names: Mapping[str, str] | None) -> tuple[list[Reason], list[str]]:
    """Unmatched attributes (reasons) and matched ones (sentences for the walkthrough)."""
    attrs = host.attributes
    assert attrs is not None
    reasons: list[Reason] = []
    matched: list[str] = []
    for key, attr, words in _ATTRS:
        wanted: frozenset[str] = getattr(req, key)
        if not wanted:
            continue
        have = getattr(attrs, attr)
        if have in wanted:
            matched.append(f"{words} {have} is allowed")
            continue
        have_text = f"{words} {have}" if have else f"no {words} in its certificate"
        reasons.append(reason(
            f"attr.{key}",
            f"host {host.name} has {have_text}; {vm.label}'s policy requires {_join(wanted)}",
            f"choose a host with {words} {_join(wanted)}, or ask {owner} to re-sign the policy "
            f"to allow {have or 'hosts without it'}"))
    if req.policies:
        missing = sorted(p for p in req.policies
                         if resolve_policy_names([p], policy_names) - host.policy_oids)
        if missing:
            claimed = resolve_policy_names(attrs.policies, policy_names)
            for p in missing:
                if not resolve_policy_names([p], policy_names) - claimed:
                    reasons.append(reason(
                        "attr.policy",
                        f"host {host.name}'s certificate claims policy {p}, but not every CA on its "
                        f"path asserts it, so it does not count ({vm.label}'s policy requires it)",
                        f"have the CAs above {host.name} assert {p} (or anyPolicy) in their "
                        "certificatePolicies, or choose another host"))
                    continue
                reasons.append(reason(
                    "attr.policy",
                    f"host {host.name}'s certificate lacks policy {p}, which {vm.label}'s policy requires",
                    f"choose a host certified for {p}, or have its CA issue a certificate with {p}"))
        else:
            matched.append(f"certificate policies {' + '.join(sorted(req.policies))} present")
    return reasons, matched


def _chain_names(chain: ChainResult) -> list[str]:
    return [c.name for c in chain.chain]


def decide(
    vm: VMCheck,
    host: HostCheck,
    *,
    at: dt.datetime,
    admin: AdminRef | None = None,
    grants: Sequence[GrantResult] = (),
    emergency: bool = False,
    policy_names: Mapping[str, str] | None = None,
    known_cas: Mapping[str, str] | None = None,
) -> Decision:
    """The full decision with every reason and the walkthrough.

    ``known_cas`` (fingerprint -> name, from the host trust store) lets the
    explanation say when a policy trusts a CA the console does not have at all.
    """
    errors: list[Reason] = []
    warns: list[Reason] = []
    steps: list[Step] = []
    pr = vm.policy
    pol = pr.policy
    owner_label = pr.owner.label() if pr.owner else (pol.owner if pol else "the owner")

    # 1. the owner's policy
    for r in pr.reasons:
        errors.append(r)
    warns.extend(pr.warnings)
    if pol is None:
        steps.append(Step("Owner's policy", False,
                          " ".join(r.message for r in pr.reasons) or "the VM has no usable policy",
                          pr.reasons))
    else:
        detail = (f"signed by {owner_label}, valid {pol.not_before:%Y-%m-%d} to {pol.not_after:%Y-%m-%d}, "
                  f"requires {pol.summary()}; digest {pr.digest[:16]}")
        if pr.reasons:
            detail += "; but " + " ".join(r.message for r in pr.reasons)
        steps.append(Step("Owner's policy", not pr.reasons, detail, pr.reasons))

    chain = host.chain
    # 2. trusted CA
    if pol is None:
        steps.append(Step("Trusted CA", None, "skipped: without a policy no CA is trusted"))
    elif chain is None:
        steps.append(Step("Trusted CA", None, f"skipped: no certificate is known for host {host.name}"))
    else:
        hits = [c for c in pol.trusted_cas if c.fingerprint in chain.ca_fingerprints]
        trusted = ", ".join(c.name for c in pol.trusted_cas)
        if hits:
            steps.append(Step("Trusted CA", True,
                              f"the policy trusts {hits[0].name}, which is in the chain of host {host.name}"))
        else:
            path = " -> ".join(reversed(_chain_names(chain)[1:])) or "no known CA"
            untrusted = reason(
                "ca.not_trusted",
                f"host {host.name}'s certificate chains to {path}, none of which {vm.label}'s policy "
                f"trusts (it trusts {trusted})",
                f"choose a host under {trusted}, or ask {owner_label} to trust this host's CA")
            errors.append(untrusted)
            steps.append(Step("Trusted CA", False,
                              f"the policy trusts {trusted}; {host.name} chains to {path}", (untrusted,)))
        if known_cas is not None:
            for c in pol.trusted_cas:
                if c.fingerprint not in known_cas:
                    warns.append(reason("policy.ca_unknown",
                                        f"the policy trusts CA {c.name} ({c.fingerprint[:16]}…), "
                                        "which is not in the fleet's trust directory",
                                        "add that CA certificate to trust_dir, or re-sign the policy",
                                        "warning"))

    # 3. intermediate + 4. host certificate
    if chain is None:
        why = host.problem.message if host.problem and host.problem.code.startswith("cert") else \
            f"no certificate is known for host {host.name}"
        no_cert = reason("host.no_certificate", why,
                         "set cert_file for the host in the fleet file, or refresh the host over SSH")
        errors.append(no_cert)
        steps.append(Step("Intermediate", None, "skipped: no host certificate"))
        steps.append(Step("Host certificate", False, why, (no_cert,)))
    else:
        names = _chain_names(chain)
        root = names[-1] if len(names) > 1 else "its trust anchor"
        inter = names[1:-1] if len(names) > 2 else []
        if inter:
            steps.append(Step("Intermediate", chain.valid,
                              f"Host {host.name} is issued by {' under '.join(inter)}, "
                              f"under root {root}"))
        elif len(names) == 2:
            steps.append(Step("Intermediate", None,
                              f"None: host {host.name} is issued directly by root {root}"))
        else:
            steps.append(Step("Intermediate", False,
                              f"The chain of host {host.name} could not be built to a root"))
        cert_errors = list(chain.reasons)
        if not chain.valid and not chain.reasons:
            cert_errors.append(reason("cert.invalid", f"host {host.name}'s certificate chain is not valid",
                                      "check the host certificate with `escort cert verify`"))
        if chain.valid and host.attributes is None:
            cert_errors.append(reason("host.no_attributes",
                                      f"host {host.name}'s certificate attributes are unknown",
                                      "refresh the host or check its certificate file"))
        errors.extend(cert_errors)
        warns.extend(chain.warnings)
        if chain.valid and host.attributes is not None:
            days = host.attributes.days_to_expiry(at)
            steps.append(Step("Host certificate", True,
                              f"valid, chain checked to {root}; expires in {days} day(s)"))
        else:
            steps.append(Step("Host certificate", False,
                              " ".join(r.message for r in cert_errors) or "not valid", tuple(cert_errors)))

    # 5. attributes
    if pol is None or host.attributes is None:
        steps.append(Step("Attributes matched", None, "skipped: needs both a policy and a host certificate"))
    else:
        bad, good = _attribute_reasons(vm, host, pol.requirements, owner_label, policy_names)
        errors.extend(bad)
        if bad:
            steps.append(Step("Attributes matched", False, " ".join(r.message for r in bad), tuple(bad)))
        else:
            steps.append(Step("Attributes matched", True,
                              "; ".join(good) or "the policy requires no attributes"))

    # 6. grant
    grant_digest = ""
    if admin is None:
        steps.append(Step("Grant", None, "no admin given: only the placement is checked"))
    else:
        used, grant_why = authorise(grants, admin=admin, vm_uuid=vm.uuid,
                              vm_labels=pol.labels if pol else (), policy_owner=pr.owner if pol else None,
                              emergency=emergency)
        if used is not None and used.grant is not None:
            g = used.grant
            grant_digest = used.digest
            steps.append(Step("Grant", True,
                              f"Admin {admin.id} holds a grant from {owner_label} "
                              f"until {g.not_after:%Y-%m-%d %H:%M} UTC"
                              + (" (emergency only)" if g.emergency_only else "")))
        else:
            errors.extend(grant_why)
            steps.append(Step("Grant", False, " ".join(r.message for r in grant_why), tuple(grant_why)))

    # 7. the host itself
    host_notes: list[str] = []
    host_errors: list[Reason] = []
    ok_host: bool | None = True
    if host.name == vm.current_host:
        host_errors.append(reason("host.current", f"VM {vm.label} already runs on {host.name}",
                                  "choose another host as the target"))
        host_notes.append("it is the VM's current host")
    if host.reachability == "down":
        msg = host.problem.message if host.problem else f"host {host.name} is down"
        host_errors.append(reason("host.down",
                                  msg if msg.startswith("host") else f"host {host.name} is down: {msg}",
                                  host.problem.fix if host.problem and host.problem.fix else
                                  "bring the host back, or choose another"))
        host_notes.append("it is down")
    elif host.problem is not None and chain is not None:
        host_errors.append(host.problem)
        host_notes.append(host.problem.message)
    if host_errors:
        ok_host = False
    elif host.reachability == "unknown":
        ok_host = None
        host_notes.append("not contacted yet (offline decision)")
    errors.extend(host_errors)
    steps.append(Step("Host", ok_host, "; ".join(host_notes) or "up", tuple(host_errors)))

    errs = _dedupe(errors)
    allowed = not errs
    steps.append(Step("Verdict", allowed,
                      f"VM {vm.label} may move to {host.name}" if allowed else
                      f"refused: {len(errs)} check(s) failed"))
    steps = [Step(s.title, s.ok, sentence(s.detail), s.reasons) for s in steps]
    return Decision(vm.label, host.name, admin.id if admin else None, at, allowed,
                    tuple(errs) + tuple(_dedupe(warns)), tuple(steps), vm.uuid, pr.digest, grant_digest)


def _dedupe(reasons: Iterable[Reason]) -> list[Reason]:
    seen: set[Reason] = set()
    out: list[Reason] = []
    for r in reasons:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


@dataclass
class HostIndex:
    """Bitmask indexes over the eligible hosts: built once, queried per requirement set."""

    names: tuple[str, ...]
    by_ca: dict[str, int] = field(default_factory=dict)
    by_attr: dict[tuple[str, str | None], int] = field(default_factory=dict)
    by_oid: dict[str, int] = field(default_factory=dict)
    all_mask: int = 0

    @classmethod
    def build(cls, hosts: Sequence[HostCheck]) -> HostIndex:
        eligible = [h for h in hosts if h.eligible]
        idx = cls(tuple(h.name for h in eligible))
        for i, h in enumerate(eligible):
            bit = 1 << i
            idx.all_mask |= bit
            assert h.chain is not None and h.attributes is not None
            for fp in h.chain.ca_fingerprints:
                idx.by_ca[fp] = idx.by_ca.get(fp, 0) | bit
            for key, attr, _ in _ATTRS:
                k = (key, getattr(h.attributes, attr))
                idx.by_attr[k] = idx.by_attr.get(k, 0) | bit
            for oid in h.policy_oids:
                idx.by_oid[oid] = idx.by_oid.get(oid, 0) | bit
        return idx

    def mask(self, req: Requirements, oids: frozenset[str]) -> int:
        m = 0
        for fp in req.trusted_cas:
            m |= self.by_ca.get(fp, 0)
        for key, _attr, _ in _ATTRS:
            wanted: frozenset[str] = getattr(req, key)
            if wanted and m:
                a = 0
                for value in wanted:
                    a |= self.by_attr.get((key, value), 0)
                m &= a
        for oid in oids:
            if not m:
                break
            m &= self.by_oid.get(oid, 0)
        return m

    def names_of(self, mask: int) -> tuple[str, ...]:
        """The names of the hosts whose bits are set in ``mask``, in index order. The bits are
        found in ``mask``'s binary digits (lowest first) with ``str.find``: a step per set bit,
        not a shift of the ~1,000-bit mask per host (~0.3 ms per requirement set at 1,000
        hosts before)."""
        if mask < 0:
            raise ValueError("a host mask is never negative")
        names = self.names
        bits = bin(mask)[:1:-1]  # bit i is bits[i]
        out = []
        i = bits.find("1")
        while i >= 0:
            out.append(names[i])
            i = bits.find("1", i + 1)
        return tuple(out)


@dataclass
class Matrix:
    """Allowed targets per VM UUID, plus how much sharing the grouping found."""

    targets: dict[str, tuple[str, ...]]
    groups: int  # distinct (requirements, policy OIDs) sets evaluated
    eligible_hosts: int
    #: UUIDs of VMs whose current host is one their policy admits (placement is fine);
    #: the others are candidates for a placement check (`escort check`, the console)
    at_home: set[str] = field(default_factory=set)


#: one requirement group's allowed hosts and their positions (``allowed_matrix``)
Groups = dict[tuple[Requirements, frozenset[str]], tuple[tuple[str, ...], dict[str, int]]]


def allowed_row(vm: VMCheck, index: HostIndex, groups: Groups) -> tuple[tuple[str, ...], bool]:
    """One VM's allowed targets and whether its current host is one its policy admits: the
    row of ``allowed_matrix`` (which is made of these), for a caller that decides VMs one at
    a time (the console's start-up check) with one ``index`` and ``groups`` for all of them."""
    pr = vm.policy
    pol = pr.policy
    if pol is None or pr.reasons:  # (not ``valid``)
        return (), False
    key = (pol.requirements, vm.policy_oids)
    group = groups.get(key)
    if group is None:
        names = index.names_of(index.mask(pol.requirements, vm.policy_oids))
        group = groups[key] = (names, {n: i for i, n in enumerate(names)} if names else {})
    names, pos = group
    i = pos.get(vm.current_host)
    if i is None:
        return names, False
    return names[:i] + names[i + 1:], True


def allowed_matrix(vms: Sequence[VMCheck], hosts: Sequence[HostCheck], *, index: HostIndex | None = None,
                   groups: Groups | None = None) -> Matrix:
    """Allowed targets for every VM: one mask per distinct requirement set, then per-VM slicing.

    ``vms`` carry verified policies and ``hosts`` verified chains; nothing is verified here.
    ``index`` and ``groups`` (built from the same ``hosts``) may be passed in to reuse them
    when the VMs arrive in several parts (the console's start-up check decides them one at a
    time with ``allowed_row``).
    """
    if index is None:
        index = HostIndex.build(hosts)
    if groups is None:
        groups = {}
    out: dict[str, tuple[str, ...]] = {}
    home: set[str] = set()
    for vm in vms:
        out[vm.uuid], at_home = allowed_row(vm, index, groups)
        if at_home:
            home.add(vm.uuid)
    return Matrix(out, len(groups), len(index.names), home)


def allowed_targets(vm: VMCheck, hosts: Sequence[HostCheck]) -> tuple[str, ...]:
    """One VM's allowed targets (the fast path for a single row)."""
    return allowed_matrix([vm], hosts).targets[vm.uuid]


def allowed_per_pair(vms: Sequence[VMCheck], hosts: Sequence[HostCheck], *, at: dt.datetime,
                     policy_names: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    """The straightforward path: a full ``decide`` for every (VM, host) pair."""
    return {vm.uuid: tuple(h.name for h in hosts
                           if decide(vm, h, at=at, policy_names=policy_names).allowed)
            for vm in vms}


__all__ = [
    "Decision",
    "Groups",
    "HostCheck",
    "HostIndex",
    "Matrix",
    "Step",
    "VMCheck",
    "allowed_matrix",
    "allowed_per_pair",
    "allowed_row",
    "allowed_targets",
    "decide",
]
