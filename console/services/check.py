"""`escort check`: what is wrong with a fleet now, and what breaks within N days.

Every placement finding comes from the shared decision (``FleetService.explain`` ->
``decisions.decide``), the same one the console, the CLI and the host guard use; the
impact of an expiring item is the allowed-target matrix recomputed as of the moment
after it expires, compared with the matrix now. Codes: docs/CHECK.md.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from console.core import migration as mig
from console.core.check import Finding, impact_sentence, iso, placement_reasons, signer_of, tainted_findings
from console.core.envelope import reason
from console.core.inventory import VMView
from console.core.policy import SeenPolicy
from console.core.reasons import Reason
from console.services.fleet import FleetService

if TYPE_CHECKING:  # imported where used: the console's placement check (``misplaced``) needs
    # neither, and they cost ~0.4 s of imports (asyncssh, libvirt) right after its start-up check
    from console.services.guard import GuardState
    from console.services.inventory import InventoryService

DEFAULT_DAYS = 14
_OFF_STATES = {"shut off", "shutoff", "crashed"}


@dataclass(frozen=True)
class Placement:
    """A VM on a host its policy refuses (``unchecked``: the host's certificate is unknown)."""

    uuid: str
    name: str
    host: str
    reasons: tuple[Reason, ...]
    unchecked: bool = False

    @property
    def label(self) -> str:
        return self.name or self.uuid


def _no_policy_admitted(service: FleetService, host: str) -> bool:
    hosts = service.spec.hosts if service.spec else ()
    spec = next((h for h in hosts if h.name == host), None)
    return spec is None or spec.guard_no_policy != "refuse"


def misplaced(service: FleetService, at: dt.datetime | None = None, *,
              vms: Iterable[VMView] | None = None) -> list[Placement]:
    """Every VM on a host its owner's policy refuses at ``at``, with every failing check.

    The allowed-target matrix says which VMs are fine where they are (``at_home``); only
    the others get a full decision (``FleetService.explain`` -> ``decisions.decide``), so
    a healthy fleet of 10,000 VMs costs one matrix. VMs on a host that is down are not
    judged (``host.unreachable`` covers them); a VM without any policy is misplaced only on
    a host whose guard refuses such VMs (``guard_no_policy = "refuse"``).
    """
    steps = misplaced_in_steps(service, at, vms=vms, budget_s=float("inf"))
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return list(done.value)


def misplaced_in_steps(service: FleetService, at: dt.datetime | None = None, *,
                       vms: Iterable[VMView] | None = None,
                       budget_s: float = 0.005) -> Generator[None, None, list[Placement]]:
    """``misplaced`` in steps of about ``budget_s`` (it yields between them; its return value
    is the list): the console runs it on its event loop after the start-up check, where ~200
    full decisions of a 10,000-VM demo fleet in one go held every key for ~0.2 s."""
    clock = time.perf_counter
    start = clock()
    when = at or service.at
    placed = [v for v in (service.vms() if vms is None else vms) if v.host and v.state not in _OFF_STATES]
    hosts = {h.name: h for h in service.hosts()}
    home = service.matrix(when).at_home
    out: list[Placement] = []
    remembered: dict[str, SeenPolicy] | None = None  # escort's memory, read at the first policy-less VM
    for v in placed:
        view = hosts.get(v.host)
        if v.uuid in home or view is None or view.reachability == "down":
            continue
        if not service.policy_token(v.uuid):
            if remembered is None:
                remembered = service.policies_seen()
            was = remembered.get(v.uuid)
            if was is not None:  # the guard refuses it too (guard.policy_stripped)
                r = reason("guard.policy_stripped",
                           f"VM {v.name or v.uuid} carries no owner-signed policy, but escort remembers "
                           f"one (seq {was.seq}, signed by {was.owner_label or was.owner}): it was removed",
                           "re-attach the owner's newest policy to the domain (virsh metadata --set); "
                           "a host guard refuses the VM's next start or arrival until then")
                out.append(Placement(v.uuid, v.name, v.host, (r,)))
            elif not _no_policy_admitted(service, v.host):
                r = reason("guard.no_policy", f"VM {v.name or v.uuid} carries no owner-signed policy and "
                           f"host {v.host} admits only VMs with one", "attach the owner's policy")
                out.append(Placement(v.uuid, v.name, v.host, (r,)))
            continue
        errors, unchecked = placement_reasons(service.explain(v.uuid, v.host, at=when).reasons)
        if errors:
            out.append(Placement(v.uuid, v.name, v.host, tuple(errors), unchecked))
        if clock() - start > budget_s:
            yield
            start = clock()
    if at is not None:
        service.matrix()  # leave the service's cache at "now" for whoever asks next
    return out


@dataclass
class CheckReport:
    findings: list[Finding]
    checked_at: dt.datetime
    offline: bool
    days: int
    hosts: int = 0
    vms: int = 0
    guard_states: list[GuardState] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"findings": [f.as_json() for f in self.findings], "checked_at": iso(self.checked_at),
                "offline": self.offline, "days": self.days, "hosts": self.hosts, "vms": self.vms}


def _days_text(when: dt.datetime, now: dt.datetime) -> str:
    stamp = f"{when.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"
    if when <= now:
        return f"expired on {stamp}"
    days = (when - now).days
    return f"expires on {stamp} (in {days} day{'s' if days != 1 else ''})"


class CheckService:
    """Collects findings about one loaded fleet."""

    def __init__(self, service: FleetService, *, days: int = DEFAULT_DAYS, offline: bool = False,
                 inventory: InventoryService | None = None) -> None:
        self.service = service
        self.days = days
        self.offline = offline
        self._inventory = inventory
        self._impacts: dict[dt.datetime, tuple[int, int, int]] = {}

    async def run(self) -> CheckReport:
        from console.services.guard import GuardService
        from console.services.inventory import InventoryService, is_live

        s = self.service
        now = s.at
        findings: list[Finding] = []
        guard_states: list[GuardState] = []
        if not self.offline and s.spec is not None and any(is_live(h) for h in s.spec.hosts):
            inventory = self._inventory or InventoryService.for_fleet(s)
            try:
                results = await inventory.refresh()
                down = set()
                for name, r in sorted(results.items()):
                    if r.facts is None:
                        down.add(name)
                        why = r.problem.message if r.problem else "no answer"
                        findings.append(Finding(
                            "host.unreachable", "error", f"host {name} could not be reached: {why}",
                            (r.problem.fix if r.problem and r.problem.fix else
                             "check the host, its sshd and libvirtd, and the path to it"), host=name))
                guards = GuardService(s, inventory)
                up = [h.name for h in s.spec.hosts if is_live(h) and h.name not in down]
                guard_states = await guards.status(up)
                findings.extend(self._guard_findings(guard_states))
            finally:
                if self._inventory is None:
                    await inventory.close()
        findings.extend(self._half_done())  # from whatever the hosts reported (none offline)
        findings.extend(self._tainted())
        findings.extend(self._host_certificates())
        findings.extend(self._placement(now))
        findings.extend(self.expiring(now))
        return CheckReport(findings, now, self.offline, self.days, len(s.hosts()), len(s.vms()),
                           guard_states)

    # ------------------------------------------------------------------ guard
    @staticmethod
    def _guard_findings(states: Iterable[GuardState]) -> list[Finding]:
        out = []
        install = "run `escort hosts guard install {host}`"
        for st in states:
            if st.state == "missing":
                out.append(Finding("guard.missing", "error",
                                   f"host {st.host} has no escort guard: anyone with root can move VMs "
                                   "there with plain virsh, whatever their owners' policies say",
                                   install.format(host=st.host), host=st.host))
            elif st.state == "stale":
                out.append(Finding("guard.stale", "warning",
                                   f"host {st.host}'s guard is stale: {st.problem}",
                                   install.format(host=st.host), host=st.host,
                                   extra={"trust_digest": st.trust_digest,
                                          "expected_digest": st.expected_digest}))
            elif st.state == "broken":
                out.append(Finding("guard.broken", "error",
                                   f"host {st.host}'s guard does not work: {st.problem} (it refuses "
                                   "every incoming or starting VM)", install.format(host=st.host),
                                   host=st.host))
            elif st.state == "unreachable":
                out.append(Finding("guard.unchecked", "warning",
                                   f"host {st.host}'s guard could not be checked: {st.problem}",
                                   "check the SSH path to the host", host=st.host))
        return out

    # ------------------------------------------------------------------ now
    def _half_done(self) -> list[Finding]:
        facts = {h.name: list(h.facts.domains) for h in self.service.hosts() if h.facts is not None}
        out = []
        for case in mig.find_reconcile_cases(facts):
            out.append(Finding("migration.half_done", "error", case.message,
                               case.advice or "open the console's Migrations tab and reconcile",
                               vm=case.name, extra={"case": case.code,
                                                    "copies": [c.describe() for c in case.copies]}))
        return out

    def _tainted(self) -> list[Finding]:
        """Running VMs libvirt marks as driven around it (``core.check.RISKY_TAINTS``): what the
        guard cannot stop (docs/GUARD.md) still leaves this mark on the source's libvirt."""
        return tainted_findings((h.name, h.facts.domains) for h in self.service.hosts()
                                if h.facts is not None)

    def _host_certificates(self) -> list[Finding]:
        out = []
        for h in self.service.hosts():
            if h.chain is not None and not h.chain.valid and h.chain.reasons:
                first = h.chain.reasons[0]
                out.append(Finding("host.certificate", "error",
                                   f"host {h.name}'s certificate is refused: {first.message}",
                                   first.fix or "reissue the host certificate", host=h.name,
                                   reasons=h.chain.reasons))
        return out

    def _placement(self, now: dt.datetime) -> list[Finding]:
        out = []
        for p in misplaced(self.service, now):
            if p.unchecked:
                out.append(Finding("placement.unchecked", "warning",
                                   f"could not check whether VM {p.label} may run on {p.host}: "
                                   + " ".join(r.message for r in p.reasons),
                                   "refresh the host or set its cert_file", vm=p.label, host=p.host,
                                   reasons=p.reasons))
            else:
                code = p.reasons[0].code
                what = {"guard.no_policy": "which refuses it",
                        "guard.policy_stripped": "without the policy its owner signed"}.get(
                    code, "which its policy refuses")
                fix = (p.reasons[0].fix if code == "guard.policy_stripped" else
                       f"move {p.label} to an allowed host (`escort targets {p.label}`), "
                       f"or: {p.reasons[0].fix}")
                out.append(Finding("placement.violation", "error",
                                   f"VM {p.label} runs on {p.host}, {what}: "
                                   + " ".join(r.message for r in p.reasons),
                                   fix, vm=p.label, host=p.host, reasons=p.reasons))
        return out

    # ------------------------------------------------------------------ soon
    def _impact(self, when: dt.datetime, now: dt.datetime) -> str:
        after = when.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        hit = self._impacts.get(after)
        if hit is None:
            s = self.service
            current = dict(s.matrix(now).targets)
            later = dict(s.matrix(after).targets)
            lose_all = sum(1 for u, t in current.items() if t and not later.get(u))
            lose_some = sum(1 for u, t in current.items()
                            if later.get(u) and set(later.get(u, ())) < set(t))
            bad_now = {p.uuid for p in misplaced(s, now)}
            misplaced_then = sum(1 for p in misplaced(s, after) if p.uuid not in bad_now)
            hit = self._impacts[after] = (lose_all, lose_some, misplaced_then)
            s.matrix(now)  # leave the service's cache at "now" for whoever asks next
        return impact_sentence(when, *hit)

    def expiring(self, now: dt.datetime | None = None) -> list[Finding]:
        """Everything that expires within ``days`` (or has expired), soonest first, with impact."""
        now = now or self.service.at
        s = self.service
        horizon = now + dt.timedelta(days=self.days)
        items: list[tuple[dt.datetime, str, str, str, str, str]] = []  # when, code, text, fix, vm, host

        def add(when: dt.datetime | None, code: str, what: str, fix: str, vm: str = "",
                host: str = "") -> None:
            if when is not None and when <= horizon:
                items.append((when.astimezone(dt.UTC), code, what, fix, vm, host))

        for h in s.hosts():
            if h.attributes is not None:
                add(h.attributes.not_after, "expiry.host_cert", f"host {h.name}'s certificate",
                    f"issue a new certificate for {h.name} and install it in /etc/pki/qemu", host=h.name)
        for store, kind in ((s.trust, "host"), (s.owners, "owners'")):
            if store is None:
                continue
            for node in store.nodes():
                add(node.info.not_after, "expiry.ca_cert", f"{kind} CA {node.info.name}'s certificate",
                    f"renew CA {node.info.name} and distribute the new certificate "
                    "(trust_dir and `escort hosts guard install`)")
            for crl in store.crls:
                add(crl.next_update, "expiry.crl", f"the CRL of {crl.issuer} (nextUpdate)",
                    "publish a fresh CRL into the trust directory, then `escort hosts guard install`")
        signers: dict[str, tuple[dt.datetime, str]] = {}
        for v in s.vms():
            token = s.policy_token(v.uuid)
            if not token:
                continue
            pol = s.policy(v.uuid).policy
            if pol is not None:
                add(pol.not_after, "expiry.policy", f"VM {v.name or v.uuid}'s placement policy",
                    f"ask {pol.owner} to re-sign the policy (`escort policy sign`) and attach it",
                    vm=v.name or v.uuid)
            signer = signer_of(token)
            if signer is not None:
                signers.setdefault(signer.fingerprint, (signer.not_after, signer.name))
        for when, name in signers.values():
            add(when, "expiry.owner_cert", f"owner {name}'s signing certificate",
                f"issue {name} a new certificate and have the policies re-signed with it")
        for g in s.grant_results(now):
            if g.grant is not None:
                add(g.grant.not_after, "expiry.grant",
                    f"the grant for admin {g.grant.admin.id} ({g.grant.scope()}) from {g.grant.owner}",
                    "ask the owner for a new grant (`escort grant issue`) if the work is not done")
        out = []
        for when, code, what, fix, vm, host in sorted(items, key=lambda i: (i[0], i[1], i[2])):
            if when <= now:
                impact = "already in effect"
            elif code == "expiry.grant":
                impact = f"after {when:%Y-%m-%d}, that admin can no longer migrate those VMs"
            else:
                impact = self._impact(when, now)
            out.append(Finding(code, "error" if when <= now else "warning",
                               f"{what} {_days_text(when, now)}; {impact}", fix, vm=vm, host=host,
                               when=when))
        return out


__all__ = ["DEFAULT_DAYS", "CheckReport", "CheckService", "Placement", "misplaced"]
