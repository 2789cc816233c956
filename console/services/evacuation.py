"""Emergency evacuation: plan every VM off failing hosts, let the admin edit, run, summarise.

Planning (``EvacuationService.plan``) is offline over what the last refresh learned:

* **allowed set** per VM — the fleet's decision matrix (owner's policy, trusted CA,
  host attributes, target certificate chain valid now, target not down), then only
  targets that answered the refresh (``up`` with facts: we need their capacity), whose
  certificate outlives the migration (``core.migration.expected_duration_s`` plus
  the same 10-minute margin the migration pre-flight asks for), and only if the
  admin's grant covers the VM now *in an emergency* (a grant is host-independent, so
  one decision per VM answers it);
* **room** per target — ``core.evacuation.capacity_from_facts``: libvirt's free memory
  bounded by memory already promised to active domains, and ``cpus * vcpu_ratio``
  minus active domains' vCPUs (ratio 1.0 by default: no overcommit);
* **placement** — ``core.evacuation.plan_evacuation``: most constrained VM first,
  same region first, then the host left with the most free memory (spreading);
* **stuck VMs** — every candidate host with its reasons (the full decision with the
  admin and ``emergency=True``, plus our own capacity / freshness / certificate
  reasons) and the owner to call.

Running (``EvacuationService.start`` -> ``EvacuationRun``) dispatches moves with three
bounds — global, per source, per target — and reports every VM's phase and progress
as typed events (``VMUpdate``, ``RunFinished``) to an async or plain callback. A
failed move never stops the others; after *every* move the VM is looked for on its
source and target (a fresh libvirt read), so "still on the source" is checked, not
assumed. The moves themselves are made by a ``Mover`` (the migration service, with its
pre-flight, TLS pin, watchdog and per-migration audit entries); the evacuation adds
one audit entry for the confirmed plan before anything moves and one for the summary.

Parallelism defaults, and why:

* global 10: a cold SSH pool opens one connection per host in flight, all through the
  jump host, and OpenSSH's default ``MaxStartups 10:30:100`` starts *dropping*
  unauthenticated connections beyond 10;
* per target 2: QEMU takes one port of the migration range (49152-49215, 64 ports) per
  incoming migration, shared with anyone else migrating to that host, and parallel
  incoming streams only split the target's bandwidth; 2 keeps it busy while the
  queue spreads over other targets (never more than 64);
* per source 4: outgoing streams share the failing host's migration link; more of them
  makes each converge more slowly while its guests keep dirtying memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from console.core.errors import EscortError, InputError
from console.core.evacuation import (
    Capacity,
    EvacuationPlan,
    Evacuee,
    Move,
    Stuck,
    capacity_from_facts,
    group_reasons,
    plan_evacuation,
    room_reason,
)
from console.core.evacuation import drop as drop_move
from console.core.evacuation import retarget as retarget_move
from console.core.grants import AdminRef, GrantResult, authorise
from console.core.inventory import HostView
from console.core.migration import Outcome, Progress, expected_duration_s
from console.core.pki import CANode
from console.core.reasons import Reason
from console.services.fleet import FleetService

DEFAULT_PARALLEL = 10  # sshd MaxStartups 10:30:100
DEFAULT_PER_SOURCE = 4
DEFAULT_PER_TARGET = 2
MIGRATION_PORTS = 64  # qemu.conf migration_port_min/max 49152-49215
CERT_MARGIN_S = 600.0  # the migration pre-flight's margin after the expected duration
NO_OWNER = "unknown (the VM has no valid owner policy)"

RunPhase = Literal["queued", "preflight", "starting", "copying", "converging", "switchover",
                   "verifying", "moved", "failed", "aborted"]
DONE: frozenset[str] = frozenset({"moved", "failed", "aborted"})


# ---------------------------------------------------------------------------- the plan
@dataclass
class PlannedEvacuation:
    """A plan as the admin sees and edits it, with what it was computed from."""

    plan: EvacuationPlan
    capacities: dict[str, Capacity]
    at: dt.datetime
    admin: str | None
    held: list[tuple[Evacuee, Reason]] = field(default_factory=list)  # not running / source down
    notes: list[Reason] = field(default_factory=list)  # about the plan as a whole
    title: str = ""  # "evacuate fra-1" / "drain CA Region EU (revoked)"
    explained: bool = True  # False: stuck VMs' reasons wait for EvacuationService.explain_stuck
    excluded: set[str] = field(default_factory=set)  # not targets either (a drain's other hosts)
    live: set[str] = field(default_factory=set)  # hosts that answered the refresh
    cert_short: dict[tuple[str, str], dt.datetime] = field(default_factory=dict)  # (VM, host) -> until

    @property
    def sources(self) -> tuple[str, ...]:
        return self.plan.sources

    @property
    def moves(self) -> list[Move]:
        return self.plan.moves

    @property
    def stuck(self) -> list[Stuck]:
        return self.plan.stuck

    def find(self, vm: str) -> Move:
        """A planned move by VM UUID or (unique) name; InputError otherwise."""
        hits = [m for m in self.plan.moves if m.vm.uuid == vm.lower() or m.vm.name == vm]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise InputError(f"{len(hits)} planned VMs are named {vm!r}; use the UUID")
        raise InputError(f"VM {vm!r} is not among the planned moves")

    def retarget(self, vm: str, target: str) -> Reason | None:
        """Send one VM elsewhere (only among its allowed hosts with room); why not, or None."""
        return retarget_move(self.plan, self.find(vm).vm.uuid, target, self.capacities)

    def drop(self, vm: str) -> None:
        """Leave one VM where it is; it is reported as dropped by the admin."""
        drop_move(self.plan, self.find(vm).vm.uuid)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "sources": list(self.sources),
            "admin": self.admin,
            "at": _iso(self.at),
            "moves": [_move_json(m) for m in self.moves],
            "stuck": [_stuck_json(s) for s in self.stuck],
            "not_movable": [{**_vm_json(v), "reasons": [r.as_json()]} for v, r in self.held],
            "dropped": [_vm_json(v) for v in self.plan.dropped],
            "notes": [r.as_json() for r in self.notes],
            "load": {h: {"memory_mib": m, "vcpus": c} for h, (m, c) in sorted(self.plan.load().items())},
        }

    def lines(self, *, hosts_per_reason: int = 4) -> list[str]:
        """The plan as plain text (the CLI prints it; the UI can copy it)."""
        out = [f"{self.title or 'evacuation'} — {len(self.moves)} move(s), {len(self.stuck)} stuck, "
               f"{len(self.held)} not movable" + (f", admin {self.admin}" if self.admin else "")]
        for r in self.notes:
            out.append(f"  ! {r.message}")
        if self.moves:
            out.append("Moves:")
            for m in self.moves:
                out.append(f"  {m.vm.name:<20} {m.vm.source} -> {m.target:<14} "
                           f"{m.vm.memory_mib} MiB, {m.vm.vcpus} vCPU")
        if self.stuck:
            out.append("Stuck (no possible target: the reasons per host) — call the owner:")
            for s in self.stuck:
                out.append(f"  {s.vm.name} on {s.vm.source}, owner {s.owner_to_contact}:")
                for reason, hosts in group_reasons(s.why_not):
                    shown = ", ".join(hosts[:hosts_per_reason])
                    extra = len(hosts) - hosts_per_reason
                    more = f" (+{extra} more)" if extra > 0 else ""
                    out.append(f"    [{reason.code}] {shown}{more}: {reason.message}")
        if self.held:
            out.append("Not movable:")
            for v, r in self.held:
                out.append(f"  {v.name} on {v.source}, owner {v.owner}: {r.message}")
        if self.plan.dropped:
            out.append("Dropped by the admin: " + ", ".join(v.name for v in self.plan.dropped))
        return out


def _iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _vm_json(v: Evacuee) -> dict[str, Any]:
    return {"vm": v.name, "uuid": v.uuid, "source": v.source, "owner": v.owner,
            "memory_mib": v.memory_mib, "vcpus": v.vcpus}


def _move_json(m: Move) -> dict[str, Any]:
    return {**_vm_json(m.vm), "target": m.target, "allowed": sorted(m.vm.allowed)}


def _stuck_json(s: Stuck) -> dict[str, Any]:
    return {**_vm_json(s.vm), "owner_to_contact": s.owner_to_contact,
            "candidates": [{"host": h, "reasons": [r.as_json() for r in rs]} for h, rs in s.why_not]}


# ---------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Limits:
    """How many moves at once: in total, leaving one source, arriving at one target."""

    parallel: int = DEFAULT_PARALLEL
    per_source: int = DEFAULT_PER_SOURCE
    per_target: int = DEFAULT_PER_TARGET

    def __post_init__(self) -> None:
        for name in ("parallel", "per_source", "per_target"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1")
        if self.per_target > MIGRATION_PORTS:
            raise InputError(f"per target must be at most {MIGRATION_PORTS}: QEMU needs one port of "
                             "the migration range 49152-49215 per incoming migration")

    @classmethod
    def for_parallel(cls, parallel: int | None) -> Limits:
        """``--parallel N``: N in total; the per-host bounds never exceed it."""
        if parallel is None:
            return cls()
        if parallel < 1:
            raise InputError("--parallel must be at least 1")
        return cls(parallel, min(DEFAULT_PER_SOURCE, parallel), min(DEFAULT_PER_TARGET, parallel))


@dataclass(frozen=True)
class VMUpdate:
    """One VM's row on the board, as of now (events carry a fresh copy each time)."""

    uuid: str
    name: str
    source: str
    target: str
    owner: str
    phase: RunPhase
    progress: Progress | None = None
    message: str = ""
    reasons: tuple[Reason, ...] = ()
    vm_on: str = ""  # where it was verified running ("" until checked / when unclear)
    elapsed_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.phase in DONE

    def as_json(self) -> dict[str, Any]:
        return {"vm": self.name, "uuid": self.uuid, "source": self.source, "target": self.target,
                "owner": self.owner, "phase": self.phase, "message": self.message,
                "reasons": [r.as_json() for r in self.reasons], "vm_on": self.vm_on,
                "elapsed_s": round(self.elapsed_s, 3),
                "progress": self.progress.as_json() if self.progress else None}


@dataclass
class Summary:
    """The end of a run: what moved, what failed (and where it runs now), what could not move."""

    title: str
    admin: str | None
    started: dt.datetime
    finished: dt.datetime
    moved: list[VMUpdate]
    failed: list[VMUpdate]  # failed or aborted; vm_on says where it runs (checked)
    stuck: list[Stuck]
    held: list[tuple[Evacuee, Reason]]
    dropped: list[Evacuee]

    @property
    def all_moved(self) -> bool:
        return not (self.failed or self.stuck or self.held or self.dropped)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title, "admin": self.admin, "started": _iso(self.started),
            "finished": _iso(self.finished),
            "moved": [{"vm": u.name, "uuid": u.uuid, "from": u.source, "to": u.target,
                       "elapsed_s": round(u.elapsed_s, 3),
                       "downtime_ms": u.progress.downtime_ms if u.progress else None} for u in self.moved],
            "failed": [{"vm": u.name, "uuid": u.uuid, "from": u.source, "to": u.target,
                        "result": u.phase, "reason": u.message,
                        "reasons": [r.as_json() for r in u.reasons], "runs_on": u.vm_on,
                        "owner": u.owner} for u in self.failed],
            "not_movable": [{"vm": s.vm.name, "uuid": s.vm.uuid, "on": s.vm.source,
                             "owner_to_contact": s.owner_to_contact,
                             "reasons": [{"code": r.code, "message": r.message, "hosts": hosts}
                                         for r, hosts in group_reasons(s.why_not)]} for s in self.stuck]
            + [{"vm": v.name, "uuid": v.uuid, "on": v.source, "owner_to_contact": v.owner,
                "reasons": [{"code": r.code, "message": r.message, "hosts": []}]} for v, r in self.held],
            "dropped": [_vm_json(v) for v in self.dropped],
        }

    def text(self) -> str:
        """Plain text to print or copy: one line per VM, the owner to call where it matters."""
        took = (self.finished - self.started).total_seconds()
        out = [f"{self.title}: {len(self.moved)} moved, {len(self.failed)} failed, "
               f"{len(self.stuck) + len(self.held)} not movable, {len(self.dropped)} dropped "
               f"({took:.1f} s)"]
        for u in self.moved:
            out.append(f"  moved   {u.name}: {u.source} -> {u.target} ({u.elapsed_s:.1f} s)")
        for u in self.failed:
            where = f"still running on {u.vm_on}" if u.vm_on else "NOT verified on any host (reconcile)"
            said = u.message.rstrip(".")
            tail = "" if where in said else f"; {where}"
            out.append(f"  {u.phase:<7} {u.name}: {u.source} -> {u.target}: {said}{tail}")
        for s in self.stuck:
            first = group_reasons(s.why_not)
            why = "; ".join(f"{r.code} on {len(h)} host(s)" for r, h in first[:3]) or "no candidate host"
            out.append(f"  stuck   {s.vm.name} on {s.vm.source}: {why}; call {s.owner_to_contact}")
        for v, r in self.held:
            out.append(f"  held    {v.name} on {v.source}: {r.message} (owner {v.owner})")
        for v in self.dropped:
            out.append(f"  dropped {v.name} on {v.source} (left there by the admin)")
        return "\n".join(out)


@dataclass(frozen=True)
class RunFinished:
    summary: Summary


EvacuationEvent = VMUpdate | RunFinished
EventSink = Callable[[EvacuationEvent], object]  # may return an awaitable
ProgressFn = Callable[[Progress], None]


class Mover(Protocol):
    """Makes one move (pre-flight, TLS migration, watchdog, per-move audit).

    Returns the outcome; it must return (not hang) soon after ``abort`` is set. Raising
    ``EscortError`` counts as a failed move with that message.
    """

    async def move(self, move: Move, *, admin: str | None, on_progress: ProgressFn,
                   abort: asyncio.Event) -> Outcome: ...


class Locator(Protocol):
    """Where is the VM now? ``{host: state}`` for the given hosts (a fresh read).

    The state is libvirt's word ("running", "paused", ...), "" when the VM is not on
    that host, and "unknown: <why>" when the host could not be asked.
    """

    async def states(self, uuid: str, hosts: Sequence[str]) -> dict[str, str]: ...


class AuditSink(Protocol):
    def append(self, fields: dict[str, Any]) -> object: ...


# ---------------------------------------------------------------------------- service
#: (the admin, all grant results, those naming each VM UUID, those naming each label)
_GrantIndex = tuple[AdminRef, list[GrantResult], dict[str, list[GrantResult]], dict[str, list[GrantResult]]]


class EvacuationService:
    """Plans over a ``FleetService``'s current facts; runs with a ``Mover`` and ``Locator``."""

    def __init__(self, fleet: FleetService, *, admin: str | None = None, vcpu_ratio: float = 1.0,
                 mover: Mover | None = None, locator: Locator | None = None,
                 audit: AuditSink | None = None, emergencies: Iterable[str] = ()) -> None:
        if vcpu_ratio <= 0:
            raise InputError("the vCPU ratio must be positive")
        self.fleet = fleet
        self.admin = admin
        self.vcpu_ratio = vcpu_ratio
        self.mover = mover
        self.locator = locator
        self.audit = audit  # where the plan and the summary are recorded (None: nowhere)
        #: source hosts under a declared emergency (services/emergency.py): only there do
        #: emergency-only grants count; a healthy host is evacuated with ordinary grants
        self.emergencies = set(emergencies)
        # decisions within one time are stable: keyed by (VM, [host,] time)
        self._why_cache: dict[tuple[str, str, dt.datetime], tuple[Reason, ...]] = {}
        self._grant_cache: dict[tuple[str, dt.datetime, bool], tuple[Reason, ...]] = {}
        self._grant_index: _GrantIndex | None = None

    # -- planning -----------------------------------------------------------------------
    def plan(self, sources: Iterable[str], *, at: dt.datetime | None = None, title: str = "",
             exclude_targets: Iterable[str] = (), explain: bool = True) -> PlannedEvacuation:
        """Plan moves for every VM on ``sources`` (host names); unknown names are an InputError.

        ``exclude_targets``: hosts that may not receive VMs either (the revoked-CA drain
        excludes every host under the CA, not only the ones that hold VMs).
        ``explain=False`` leaves stuck VMs' per-host reasons empty until ``explain_stuck``
        fills them: a full decision per (stuck VM, host) costs ~0.1 ms, which on a
        thousand-host fleet is the bulk of the work; a UI explains the VM the admin opens.
        """
        srcs = list(dict.fromkeys(sources))
        if not srcs:
            raise InputError("name at least one host to evacuate")
        views = {h.name: h for h in self._host_views()}
        unknown = [s for s in srcs if s not in views]
        if unknown:
            raise InputError(f"no host {unknown[0]!r} in fleet {self.fleet.name or self.fleet.path}")
        when = at or self.fleet.at
        excluded = set(srcs) | set(exclude_targets)
        notes: list[Reason] = []
        capacities: dict[str, Capacity] = {}
        live: set[str] = set()
        for name, view in views.items():
            facts = view.facts
            if view.reachability == "up" and facts is not None:
                live.add(name)
                capacities[name] = capacity_from_facts(name, view.spec.region, facts,
                                                       vcpu_ratio=self.vcpu_ratio,
                                                       kernel_free=self.fleet.kind != "demo")
            else:
                capacities[name] = Capacity(name, view.spec.region, 0, 0)
        for s in srcs:
            if s not in live:
                problem = views[s].problem
                why = problem.message if problem is not None else "it has not been refreshed"
                notes.append(Reason("evacuate.source_unreachable",
                                    f"{s} cannot be reached ({why.rstrip('.')}): its VMs cannot be "
                                    "live-migrated and are listed from the fleet file only.",
                                    "bring libvirt on the host back, or recover its VMs another way"))
        for s in srcs:
            chain = views[s].chain
            if chain is not None and not chain.valid:
                first = chain.reasons[0].message if chain.reasons else "it is not valid"
                notes.append(Reason(
                    "evacuate.source_cert",
                    f"{s}'s certificate is refused ({first.rstrip('.')}); QEMU presents it as the TLS "
                    "client certificate, so targets will likely refuse its migration streams.",
                    f"renew {s}'s certificate under a trusted CA, or recover its VMs another way",
                    "warning"))
        evacuees: list[Evacuee] = []
        held: list[tuple[Evacuee, Reason]] = []
        region = {n: v.spec.region for n, v in views.items()}
        expiry = {n: v.attributes.not_after for n, v in views.items()
                  if v.attributes is not None}
        cert_short: dict[tuple[str, str], dt.datetime] = {}
        self._grant_index = self._index_grants(when) if self.admin is not None else None
        for vm in self.fleet.vms():
            if vm.host not in srcs:
                continue
            base = Evacuee(vm.uuid, vm.name, vm.host, region.get(vm.host, ""), vm.memory_mib, vm.vcpus,
                           vm.owner or NO_OWNER, frozenset())
            if vm.host not in live:
                held.append((base, Reason("evacuate.source_unreachable",
                                          f"{vm.name}: its host {vm.host} cannot be reached.")))
                continue
            if vm.state != "running":
                held.append((base, Reason("evacuate.not_running",
                                          f"{vm.name} is {vm.state} on {vm.host}; only running VMs are "
                                          "live-migrated.", "start it elsewhere once the owner agrees")))
                continue
            need_until = when + dt.timedelta(seconds=expected_duration_s(vm.memory_mib) + CERT_MARGIN_S)
            allowed = set()
            for t in vm.allowed_targets:
                if t in excluded or t not in live:
                    continue
                if expiry.get(t) is None or expiry[t] < need_until:
                    cert_short[(vm.uuid, t)] = need_until
                    continue
                allowed.add(t)
            urgent = vm.host in self.emergencies
            if allowed and self.admin is not None and self._grant_reasons(vm.uuid, when, urgent):
                # the grant is the only thing between the VM and these hosts
                self._why_cache.update({(vm.uuid, h, when): self._grant_reasons(vm.uuid, when, urgent)
                                        for h in allowed})
                allowed = set()
            evacuees.append(replace(base, allowed=frozenset(allowed)))
        candidates = [c for n, c in capacities.items() if n not in excluded]

        def why_not(v: Evacuee, h: str) -> tuple[Reason, ...]:
            return self._why_not(v, h, when, live, cert_short) if explain else ()

        plan = plan_evacuation(evacuees, candidates, why_not, sources=srcs)
        plan.sources = tuple(srcs)
        if self.admin is None:
            notes.append(Reason("evacuate.no_admin", "No admin given: grants were not checked; the "
                                "migration pre-flight will check them before each move.",
                                "pass --admin ID", "warning"))
        return PlannedEvacuation(plan, capacities, when, self.admin, held, notes,
                                 title or f"evacuate {', '.join(srcs)}", explained=explain,
                                 excluded=set(exclude_targets), live=live, cert_short=cert_short)

    def _host_views(self) -> list[HostView]:
        """The fleet's host views; their chains are checked once per minute and shared
        with the decision matrix (FleetService caches per host and time)."""
        return self.fleet.hosts()

    def explain_stuck(self, planned: PlannedEvacuation, vms: Iterable[str] | None = None) -> None:
        """Fill in every candidate host's reasons for stuck VMs (all, or the named ones)."""
        wanted = None if vms is None else set(vms)
        load = planned.plan.load()
        excluded = set(planned.sources) | planned.excluded
        left = {n: replace(c, free_memory_mib=c.free_memory_mib - load.get(n, (0, 0))[0],
                           free_vcpus=c.free_vcpus - load.get(n, (0, 0))[1])
                for n, c in planned.capacities.items() if n not in excluded}
        for i, s in enumerate(planned.plan.stuck):
            done = any(reasons for _host, reasons in s.why_not)
            if done or (wanted is not None and s.vm.uuid not in wanted and s.vm.name not in wanted):
                continue
            why = tuple((h, (room_reason(left[h], s.vm),) if h in s.vm.allowed else
                         self._why_not(s.vm, h, planned.at, planned.live, planned.cert_short))
                        for h in sorted(left))
            planned.plan.stuck[i] = Stuck(s.vm, why)
        if wanted is None:
            planned.explained = True

    def _index_grants(self, at: dt.datetime) -> _GrantIndex:
        """The admin's grants, indexed by the VM UUIDs and labels they name.

        A grant can only authorise a VM it names (check_grant), so trying just those is
        the same answer as trying all of them — and with one grant per owner in a big
        fleet, an order of magnitude faster. Reasons for a VM no grant covers still come
        from all of them (``authorise``), so the admin sees every near miss.
        """
        assert self.admin is not None
        spec = next((a for a in self.fleet.admins if a.id == self.admin), None)
        ref = (AdminRef(self.admin, spec.ssh_key_fingerprint, spec.cert_fingerprint) if spec
               else AdminRef(self.admin))
        # FleetService verifies (and caches) grant tokens but has no public accessor for the
        # results yet; read them through its internals like services/migration.py does.
        results: list[GrantResult] = list(self.fleet.grant_results(at))
        by_uuid: dict[str, list[GrantResult]] = {}
        by_label: dict[str, list[GrantResult]] = {}
        for r in results:
            if r.grant is None or r.grant.admin.id != self.admin:
                continue
            for u in r.grant.vms:
                by_uuid.setdefault(u, []).append(r)
            if r.grant.label:
                by_label.setdefault(r.grant.label, []).append(r)
        return ref, results, by_uuid, by_label

    def _grant_reasons(self, vm_uuid: str, at: dt.datetime, emergency: bool = False) -> tuple[Reason, ...]:
        """Why the admin's grants do not cover this VM (empty: they do); emergency-only
        grants count only with ``emergency`` (its source is under a declared emergency)."""
        hit = self._grant_cache.get((vm_uuid, at, emergency))
        if hit is not None:
            return hit
        assert self._grant_index is not None and self.admin is not None
        ref, results, by_uuid, by_label = self._grant_index
        if not any(a.id == self.admin for a in self.fleet.admins):
            out: tuple[Reason, ...] = (Reason(
                "grant.unknown_admin", f"Admin {self.admin!r} is not in the fleet file's [[admins]].",
                "add the admin (id and SSH key fingerprint) to the fleet file"),)
        else:
            pr = self.fleet.policy(vm_uuid, at)
            labels = pr.policy.labels if pr.policy else ()
            owner = pr.owner if pr.policy else None
            named = list(by_uuid.get(vm_uuid, []))
            for label in labels:
                named += [r for r in by_label.get(label, []) if r not in named]
            used, _ = authorise(named, admin=ref, vm_uuid=vm_uuid, vm_labels=labels, policy_owner=owner,
                                emergency=emergency) if named else (None, [])
            if used is not None:
                out = ()
            else:
                _, why = authorise(results, admin=ref, vm_uuid=vm_uuid, vm_labels=labels,
                                   policy_owner=owner, emergency=emergency)
                # one reason per code: with one grant per owner, "the grant covers other VMs"
                # fifty times over tells the admin nothing the first one does not
                firsts = {r.code: r for r in reversed(why)}
                out = tuple(firsts[c] for c in dict.fromkeys(r.code for r in why))
                if not out:
                    out = (Reason("grant.missing", f"No grant covers admin {self.admin!r} for this VM.",
                                  "ask the VM's owner for a grant"),)
        self._grant_cache[(vm_uuid, at, emergency)] = out
        return out

    def _why_not(self, vm: Evacuee, host: str, at: dt.datetime, live: set[str],
                 cert_short: dict[tuple[str, str], dt.datetime]) -> tuple[Reason, ...]:
        """Why ``host`` cannot take ``vm``: the full decision, then our own checks."""
        key = (vm.uuid, host, at)
        hit = self._why_cache.get(key)
        if hit is not None:
            return hit
        # placement only (a decision with the admin re-checks every grant per host: the
        # grant does not depend on the host, so its reasons are computed once per VM)
        d = self.fleet.explain(vm.uuid, host, None, at, emergency=True)
        errors = [r for r in d.reasons if r.severity == "error"]
        if self.admin is not None:
            errors += [r for r in self._grant_reasons(vm.uuid, at, vm.source in self.emergencies)
                       if r not in errors]
        if not errors:
            if host not in live:
                view = next(h for h in self.fleet.hosts() if h.name == host)
                errors.append(view.problem or Reason(
                    "evacuate.not_refreshed", f"{host} has not answered a refresh, so its room is unknown.",
                    "refresh the hosts, then plan again"))
            elif (vm.uuid, host) in cert_short:
                errors.append(Reason(
                    "evacuate.cert_expiring",
                    f"{host}'s certificate expires before {cert_short[(vm.uuid, host)]:%Y-%m-%d %H:%M} UTC, "
                    "when this migration and its safety margin would end.",
                    "renew the host's certificate"))
            else:
                errors.append(Reason("evacuate.excluded", f"{host} is itself being evacuated or drained.",
                                     "choose a host outside the evacuation"))
        out = tuple(errors)
        self._why_cache[key] = out
        return out

    def ca_node(self, ca: str) -> CANode:
        """The CA named by fingerprint (hex, colons allowed) or by name; InputError otherwise."""
        store = self.fleet.trust
        if store is None:
            raise InputError("the fleet has no usable host CA trust directory")
        node = store.by_fingerprint(ca)
        if node is not None:
            return node
        named = [n for n in store.nodes() if n.info.name == ca or n.info.subject == ca]
        if len(named) == 1:
            return named[0]
        if named:
            raise InputError(f"{len(named)} CAs are named {ca!r}; use the fingerprint")
        raise InputError(f"no CA {ca!r} in the fleet's trust directory "
                         "(give its name or SHA-256 fingerprint)")

    def plan_drain(self, ca: str, *, at: dt.datetime | None = None,
                   explain: bool = True) -> PlannedEvacuation:
        """Every VM on hosts whose chain passes through ``ca``, planned onto hosts outside it."""
        node = self.ca_node(ca)
        when = at or self.fleet.at
        status = node.status(when)
        fp = node.info.fingerprint
        under = sorted(h.name for h in self.fleet.hosts()
                       if h.chain is not None and fp in h.chain.ca_fingerprints)
        title = f"drain CA {node.info.name} ({status})"
        if not under:
            raise EscortError(f"no host of fleet {self.fleet.name or self.fleet.path} has a certificate "
                              f"under CA {node.info.name}: nothing to drain")
        planned = self.plan(under, at=when, title=title, exclude_targets=under, explain=explain)
        if status not in ("revoked", "expiring", "expired"):
            planned.notes.insert(0, Reason("drain.ca_valid", f"CA {node.info.name} is {status}: draining it "
                                           "is a choice, not a necessity.", "", "warning"))
        return planned

    # -- running ------------------------------------------------------------------------
    def start(self, planned: PlannedEvacuation, *, limits: Limits | None = None,
              on_event: EventSink | None = None) -> EvacuationRun:
        """Begin running a confirmed plan (ReadOnlyError in read-only mode)."""
        self.fleet.require_writable("evacuation")
        if self.fleet.kind == "demo":
            raise EscortError("the demo fleet runs on libvirt's test driver, which cannot live-migrate: "
                              "moving VMs needs real hosts (try `escort lab up`)")
        if self.mover is None or self.locator is None:
            raise EscortError("this console has no migration engine to run the evacuation with")
        return EvacuationRun(self, planned, limits or Limits(), on_event)

    def record(self, fields: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append({"kind": "evacuation", **fields})

    async def record_signed(self, fields: dict[str, Any]) -> None:
        """Like ``record``, signed by the acting admin when the mover can (MigrationMover)."""
        signed = getattr(self.mover, "record", None)
        if signed is not None and self.audit is not None:
            await signed({"kind": "evacuation", **fields})
        else:
            self.record(fields)


class EvacuationRun:
    """One running evacuation: its board, per-VM abort and abort-all, and the summary."""

    def __init__(self, service: EvacuationService, planned: PlannedEvacuation, limits: Limits,
                 on_event: EventSink | None) -> None:
        self.service = service
        self.planned = planned
        self.limits = limits
        self._on_event = on_event
        self.board: dict[str, VMUpdate] = {
            m.vm.uuid: VMUpdate(m.vm.uuid, m.vm.name, m.vm.source, m.target, m.vm.owner, "queued")
            for m in planned.moves}
        self._moves = {m.vm.uuid: m for m in planned.moves}
        self._aborts: dict[str, asyncio.Event] = {}
        self._stopping = False
        self._wake = asyncio.Event()  # an abort of a queued VM, or abort-all: re-run the dispatcher
        self.max_in_flight = 0  # observed (tests check the bounds)
        self.max_per_source: dict[str, int] = {}
        self.max_per_target: dict[str, int] = {}
        self.summary: Summary | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self._queues: list[asyncio.Queue[EvacuationEvent]] = []

    # -- control --------------------------------------------------------------------------
    def abort(self, vm: str) -> bool:
        """Abort one VM's move (queued: never started; running: libvirt abort). True if it applied."""
        uuid = self.planned.find(vm).vm.uuid if vm not in self.board else vm
        row = self.board.get(uuid)
        if row is None or row.done:
            return False
        self._aborts.setdefault(uuid, asyncio.Event()).set()
        self._wake.set()
        return True

    def abort_all(self) -> None:
        """Stop dispatching and abort every move in flight; queued moves never start."""
        self._stopping = True
        for uuid, row in self.board.items():
            if not row.done:
                self._aborts.setdefault(uuid, asyncio.Event()).set()
        self._wake.set()

    # -- events ---------------------------------------------------------------------------
    def queue(self) -> asyncio.Queue[EvacuationEvent]:
        """A queue that receives every event from now on (a UI board can ``await q.get()``
        in a worker); the last event of a run is ``RunFinished``."""
        q: asyncio.Queue[EvacuationEvent] = asyncio.Queue()
        self._queues.append(q)
        return q

    async def _emit(self, event: EvacuationEvent) -> None:
        for q in self._queues:
            q.put_nowait(event)
        if self._on_event is None:
            return
        result = self._on_event(event)
        if inspect.isawaitable(result):
            await result

    def _emit_soon(self, row: VMUpdate) -> None:
        """Progress arrives from a plain callback: deliver it without blocking the mover."""
        task = asyncio.ensure_future(self._emit(row))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _update(self, uuid: str, **changes: Any) -> VMUpdate:
        row = replace(self.board[uuid], **changes)
        self.board[uuid] = row
        await self._emit(row)
        return row

    # -- the run --------------------------------------------------------------------------
    async def run(self) -> Summary:
        """Run every move within the bounds; returns (and emits) the summary."""
        svc = self.service
        started = dt.datetime.now(dt.UTC)
        prove = getattr(svc.mover, "prove", None)
        if prove is not None:  # the operator proves the admin's key before anything moves
            await prove(self.planned.admin, f"{self.planned.title or 'evacuation'}")
        await svc.record_signed({"event": "start", "title": self.planned.title, "admin": self.planned.admin,
                    "sources": list(self.planned.sources), "plan": self.planned.as_json(),
                    "limits": {"parallel": self.limits.parallel, "per_source": self.limits.per_source,
                               "per_target": self.limits.per_target}})
        for row in list(self.board.values()):
            await self._emit(row)
        queue = [m.vm.uuid for m in self.planned.moves]
        running: dict[asyncio.Task[None], str] = {}
        per_source: dict[str, int] = {}
        per_target: dict[str, int] = {}
        while queue or running:
            if not self._stopping:
                for uuid in list(queue):
                    m = self._moves[uuid]
                    if self._aborts.get(uuid) is not None and self._aborts[uuid].is_set():
                        queue.remove(uuid)
                        await self._finish_unstarted(uuid, "aborted before it started")
                        continue
                    if (len(running) >= self.limits.parallel
                            or per_source.get(m.vm.source, 0) >= self.limits.per_source
                            or per_target.get(m.target, 0) >= self.limits.per_target):
                        continue
                    queue.remove(uuid)
                    per_source[m.vm.source] = per_source.get(m.vm.source, 0) + 1
                    per_target[m.target] = per_target.get(m.target, 0) + 1
                    self.max_per_source[m.vm.source] = max(self.max_per_source.get(m.vm.source, 0),
                                                           per_source[m.vm.source])
                    self.max_per_target[m.target] = max(self.max_per_target.get(m.target, 0),
                                                        per_target[m.target])
                    self._aborts.setdefault(uuid, asyncio.Event())
                    running[asyncio.create_task(self._one(m))] = uuid
                    self.max_in_flight = max(self.max_in_flight, len(running))
            else:
                for uuid in queue:
                    await self._finish_unstarted(uuid, "aborted before it started (abort all)")
                queue.clear()
            if not running:
                if queue and not self._stopping:  # cannot happen with bounds >= 1; never spin
                    raise EscortError("evacuation scheduler stalled")
                continue
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            for task in done:
                if task is waiter:
                    continue
                uuid = running.pop(task)  # type: ignore[arg-type]
                m = self._moves[uuid]
                per_source[m.vm.source] -= 1
                per_target[m.target] -= 1
                exc = task.exception()
                if exc is not None and not self.board[uuid].done:  # a bug in a mover: still reported
                    await self._settle(m, Outcome("failed", "", f"unexpected {type(exc).__name__}: {exc}"),
                                       0.0)
        rows = [self.board[m.vm.uuid] for m in self.planned.moves]
        summary = Summary(
            self.planned.title, self.planned.admin, started, dt.datetime.now(dt.UTC),
            moved=[r for r in rows if r.phase == "moved"],
            failed=[r for r in rows if r.phase in ("failed", "aborted")],
            stuck=list(self.planned.stuck), held=list(self.planned.held),
            dropped=list(self.planned.plan.dropped))
        self.summary = summary
        await svc.record_signed({"event": "summary", "admin": self.planned.admin, **summary.as_json()})
        await self._emit(RunFinished(summary))
        return summary

    async def _finish_unstarted(self, uuid: str, message: str) -> None:
        m = self._moves[uuid]
        await self._update(uuid, phase="aborted", message=message, vm_on=await self._where(m, "aborted"))

    async def _one(self, m: Move) -> None:
        uuid = m.vm.uuid
        abort = self._aborts[uuid]
        t0 = time.monotonic()
        await self._update(uuid, phase="preflight", message="checking before the move")
        loop = asyncio.get_running_loop()

        def on_progress(p: Progress) -> None:
            phase: RunPhase = "verifying" if p.phase == "completed" else (
                p.phase if p.phase not in ("failed", "aborted") else self.board[uuid].phase)
            row = replace(self.board[uuid], phase=phase, progress=p, message=p.message,
                          elapsed_s=time.monotonic() - t0)
            self.board[uuid] = row
            if self._on_event is not None or self._queues:
                loop.call_soon(self._emit_soon, row)

        mover = self.service.mover
        assert mover is not None
        try:
            outcome = await mover.move(m, admin=self.planned.admin, on_progress=on_progress, abort=abort)
        except EscortError as exc:
            outcome = Outcome("failed", "", str(exc))
        except Exception as exc:  # one VM's surprise must not end the others' moves
            outcome = Outcome("failed", "", f"unexpected {type(exc).__name__}: {exc}")
        await self._settle(m, outcome, time.monotonic() - t0)

    async def _where(self, m: Move, result: str) -> str:
        """Where the VM runs now, checked; "" when not exactly one of source/target runs it."""
        locator = self.service.locator
        assert locator is not None
        try:
            states = await locator.states(m.vm.uuid, [m.vm.source, m.target])
        except EscortError:
            return ""
        running = [h for h, s in states.items() if s == "running"]
        return running[0] if len(running) == 1 else ""

    async def _settle(self, m: Move, outcome: Outcome, elapsed: float) -> None:
        """Record how the move ended by where the VM is found running, not by what was reported."""
        uuid = m.vm.uuid
        await self._update(uuid, phase="verifying", message="looking for the VM on source and target",
                           elapsed_s=elapsed)
        on = await self._where(m, outcome.result)
        reasons = tuple(outcome.reasons)
        if on == m.target:
            # it runs on its target: moved, whatever was reported (an abort that came too late)
            note = "" if outcome.result == "success" else (
                f"reported {outcome.result} ({outcome.message or 'no message'}) but found running on "
                f"{m.target}")
            await self._update(uuid, phase="moved", message=note, vm_on=on, reasons=reasons,
                               elapsed_s=elapsed, progress=self.board[uuid].progress)
            return
        phase: RunPhase = "aborted" if outcome.result == "aborted" else "failed"
        message = outcome.message or (reasons[0].message if reasons else outcome.result)
        if outcome.result == "success":
            phase = "failed"
            message = f"the migration reported success but {m.vm.name} was not found running on {m.target}"
        if not on:
            message += "; it was not found running on exactly one of source and target: run reconcile"
        await self._update(uuid, phase=phase, message=message, vm_on=on, reasons=reasons, elapsed_s=elapsed)


# ---------------------------------------------------------------------------- adapters
class InventoryLocator:
    """``Locator`` over an ``InventoryService``: reads the hosts' libvirt now, updates the fleet."""

    def __init__(self, inventory: Any, fleet: FleetService | None = None) -> None:
        self.inventory = inventory
        self.fleet = fleet

    async def states(self, uuid: str, hosts: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in hosts:
            try:
                host = await self.inventory.libvirt(name)
                facts = await host.facts()
            except EscortError as exc:
                out[name] = f"unknown: {exc}"
                continue
            if self.fleet is not None:
                self.fleet.apply_facts(name, facts, None)
            dom = next((d for d in facts.domains if d.uuid.lower() == uuid.lower()), None)
            out[name] = dom.state if dom is not None else ""
        return out


class MigrationMover:
    """``Mover`` over the migration service: its pre-flight, TLS migration, watchdog and audit.

    Every move gets the migration service's full pre-flight again just before it starts
    (facts may have changed since the plan); a refusal is a failed move with the
    pre-flight's reasons, and nothing was asked of libvirt.
    """

    def __init__(self, migrations: Any, proof: Any = None) -> None:
        self.migrations = migrations  # services.migration.MigrationService
        self.proof = proof  # services.identity.AdminProof: one proof for every move of a run

    async def prove(self, admin: str | None, action: str) -> Any:
        """Prove the admin's key once for the run (refused: nothing moves, the refusal is audited)."""
        from console.services.identity import is_proof

        if not is_proof(self.proof, admin):
            self.proof = await self.migrations.prove(admin, action)
        return self.proof

    async def record(self, fields: dict[str, Any]) -> None:
        """An evacuation entry in the migrations' audit log, signed with this run's proof."""
        await self.migrations._record(fields)

    async def move(self, move: Move, *, admin: str | None, on_progress: ProgressFn,
                   abort: asyncio.Event) -> Outcome:
        from console.services.identity import AdminNotProven
        from console.services.migration import MigrationRefused

        source = move.vm.source
        on_progress(Progress("preflight", message="pre-flight"))
        # emergency-only grants count only if the migration service finds an emergency for
        # the source (declared, or the host down) at this moment
        pf = await self.migrations.preflight(move.vm.uuid, move.target, admin, emergency=True)
        if abort.is_set():
            return Outcome("aborted", source, "aborted before the migration started")
        if not pf.ok:
            reasons = list(pf.reasons)
            first = reasons[0].message if reasons else "pre-flight did not pass"
            return Outcome("refused", source, f"pre-flight refused: {first}", reasons)
        try:
            run = await self.migrations.start(pf, proof=self.proof)
        except AdminNotProven as exc:
            return Outcome("refused", source, str(exc), [exc.reason()])
        except MigrationRefused as exc:
            return Outcome("refused", source, str(exc), list(pf.reasons))
        run.subscribe(lambda _run, p: on_progress(p))
        finished = asyncio.ensure_future(run.wait())
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({finished, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if aborted.done() and not finished.done():
                await run.abort("admin (evacuation)")
            result = await finished
        finally:
            aborted.cancel()
        outcome: Outcome = result.outcome
        return outcome


def open_audit(fleet: FleetService) -> AuditSink | None:
    """The fleet's audit log (``audit_log`` in the fleet file), or None when it names none."""
    spec = fleet.spec
    if spec is None or not spec.audit_log:
        return None
    from console.adapters.audit import AuditLog

    path = Path(spec.audit_log)
    if not path.is_absolute() and spec.base_dir:
        path = Path(spec.base_dir) / path
    return AuditLog(path)


__all__ = [
    "DEFAULT_PARALLEL",
    "DEFAULT_PER_SOURCE",
    "DEFAULT_PER_TARGET",
    "EvacuationEvent",
    "EvacuationRun",
    "EvacuationService",
    "InventoryLocator",
    "Limits",
    "Locator",
    "MigrationMover",
    "Mover",
    "PlannedEvacuation",
    "RunFinished",
    "Summary",
    "VMUpdate",
    "open_audit",
]
