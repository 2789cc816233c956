"""Run a live migration: pre-flight, audit, migrate3 over TLS, watch, abort, verify, reconcile.

Managed direct, not peer-to-peer (see docs/MIGRATION.md for the long version):
the console holds one libvirt connection to each host (through its own SSH
connections, known_hosts checked) and calls ``dom.migrate3(dconn, params, flags)``;
libvirt's client library drives Begin/Prepare/Perform/Finish/Confirm across both
daemons and the memory stream goes directly QEMU to QEMU over TLS. Peer-to-peer
would need every hypervisor to hold credentials for every other hypervisor's libvirt
(and ``qemu+ssh://`` from a daemon ignores the known_hosts we check); managed direct
needs none and the console sees every step.

The price: the console's connections must stay up. If one drops mid-way, libvirt
rolls back — the destination's daemon kills the unfinished incoming VM when its
client goes away, the source's migration job fails and the source VM keeps
running. The one window where that is not enough is after switch-over, before
Confirm: then the source can stay *paused* (reason "migration"). ``reconcile``
finds exactly that state and resumes the right copy, never both. The lab tests
drop the console's connections mid-migration and check the VM runs on exactly one
host.

libvirt is blocking and its connections are thread-safe: ``migrate3`` runs in a
thread of its own for the whole migration while ``jobStats``/``abortJob`` run in
other threads on the same connection (what virt-manager does). The host's own
worker thread (adapters/libvirt.py) is not used for ``migrate3`` — it would be blocked
for minutes and the inventory refresh would stall behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import libvirt
from cryptography import x509

from console.adapters.audit import AuditLog, read_entries
from console.adapters.files import read_limited
from console.adapters.libvirt import LibvirtHost, libvirt_message, read_host_facts
from console.adapters.reservations import Reservations
from console.adapters.ssh import (
    AUTH_FAILED,
    JUMP_FAILED,
    KEY_CHANGED,
    KEY_UNKNOWN,
    LIBVIRT_DOWN,
    UNREACHABLE,
)
from console.core import migration as mig
from console.core.errors import EscortError, InputError
from console.core.evacuation import memory_room
from console.core.guard import guard_refusal
from console.core.inventory import DomainFacts, HostFacts, HostSpec, HostView, VMView
from console.core.pki import load_certificates
from console.core.reasons import Reason
from console.services.emergency import declared, default_audit_path
from console.services.fleet import FleetService
from console.services.identity import (
    AdminIdentity,
    AdminNotProven,
    AdminProof,
    clock_check_against,
    is_proof,
    require_admin,
    sign_entry,
)
from console.services.inventory import InventoryService

#: Minimum time between two progress publications (the UI must not be flooded).
POLL_INTERVAL_S = 0.5
#: After an abort, how long libvirt gets to unwind before we cut the target's connection.
FINISH_GRACE_S = 10.0
#: How long an abortJob call may take before we stop waiting for its answer.
ABORT_CALL_S = 5.0
#: The deadline for verifying where the VM is after a migration ended. Verification
#: returns as soon as both hosts answered (or one is known to be gone); this is only
#: how long a host that does not answer at all is waited for.
SETTLE_S = 20.0
#: The reason libvirt gives a source it resumed after a failed switch-over (Confirm "cancelled").
CANCELLED_REASON = "migration canceled"
#: How often a host that has not given a final answer is asked again.
VERIFY_POLL_S = 0.5
#: One "where is the VM" call may take this long before it counts as no answer (yet).
VERIFY_CALL_S = 10.0
#: How often the target's libvirt is checked during the copy (a dead one ends it early).
TARGET_PROBE_S = 1.0
#: Problem codes that mean "the host answered no" (daemon down, refused): final, not waited for.
_GONE_CODES = frozenset({UNREACHABLE, LIBVIRT_DOWN, JUMP_FAILED, AUTH_FAILED, KEY_UNKNOWN, KEY_CHANGED})
#: A pre-flight older than this must be run again before it authorises anything (the
#: just-in-time checks before migrate3 re-check certificate, grant, policy and room anyway).
PREFLIGHT_MAX_AGE_S = 60.0
#: Pre-flights this service produced and that were not used yet (oldest forgotten first).
MAX_ISSUED = 256
DEMO_EXPLANATION = ("live migration needs real hosts: the demo runs on libvirt's test driver, which "
                    "cannot migrate. Start real hosts with `escort lab up` and use the lab's fleet file")


class MigrationRefused(EscortError):
    """The pre-flight refused: nothing was asked of any host."""


class ReconcileRefused(EscortError):
    """The reconcile fix was refused (no grant, or the VM changed since the scan): nothing done."""


class MigrationFailed(EscortError):
    """libvirt was asked and the migration did not complete (the VM's state is in the message)."""




@dataclass
class MigrationResult:
    run_id: str
    preflight: mig.Preflight
    plan: mig.MigrationPlan
    outcome: mig.Outcome
    progress: mig.Progress
    audit: list[dict[str, Any]] = field(default_factory=list)  # entries this run wrote

    def as_json(self) -> dict[str, Any]:
        return {"run": self.run_id, "plan": self.plan.as_json(), "outcome": self.outcome.as_json(),
                "progress": self.progress.as_json()}


ProgressCallback = Callable[["MigrationRun", mig.Progress], None]


class MigrationRun:
    """One migration in flight: its plan, latest progress, subscribers, abort, result.

    Progress is published at most every poll interval; ``updates()`` always yields
    the *latest* state (a slow reader skips intermediate ones instead of queueing).
    """

    def __init__(self, run_id: str, preflight: mig.Preflight, plan: mig.MigrationPlan) -> None:
        self.id = run_id
        self.preflight = preflight
        self.plan = plan
        self.tracker = mig.ProgressTracker()
        self.progress = self.tracker.current
        self.abort_requested: str = ""  # "" or who asked ("admin", "watchdog")
        self.memory_mib = 0  # what the target must hold (counted against its room meanwhile)
        self.emergency = False  # emergency-only grants counted (re-checked just in time the same way)
        self.reserved = False  # memory reserved on the target (just before migrate3, until the end)
        self.result: MigrationResult | None = None
        self._version = 0
        self._event = asyncio.Event()
        self._finished = False
        self._callbacks: list[ProgressCallback] = []
        self._abort_hook: Callable[[str], Any] | None = None
        self.task: asyncio.Task[MigrationResult] | None = None
        self.stopped_waiting = ""  # who stopped the verification's wait ("" = nobody)
        self.fenced = ""  # the host where escort paused the VM so it cannot run twice ("" = none)
        self._stop_wait = asyncio.Event()

    # -- publishing -----------------------------------------------------------------
    def subscribe(self, callback: ProgressCallback) -> None:
        """``callback(run, progress)`` on every publication, on the event loop's thread."""
        self._callbacks.append(callback)
        callback(self, self.progress)

    def _publish(self, progress: mig.Progress) -> None:
        self.progress = progress
        self._version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()
        for cb in list(self._callbacks):
            with contextlib.suppress(Exception):  # a broken subscriber never stops a migration
                cb(self, progress)

    def _finish(self) -> None:
        self._finished = True
        self._publish(self.progress)

    async def updates(self) -> AsyncIterator[mig.Progress]:
        """Latest progress until the migration has ended (the last one is terminal)."""
        seen = -1
        while True:
            event = self._event
            if self._version != seen:
                seen = self._version
                yield self.progress
                continue
            if self._finished:
                return
            await event.wait()

    @property
    def done(self) -> bool:
        return self._finished

    # -- control --------------------------------------------------------------------
    def stop_waiting(self, who: str = "admin") -> None:
        """End the verification's wait now: report what is known, the rest as unknown."""
        if not self._finished and not self.stopped_waiting:
            self.stopped_waiting = who
            self._stop_wait.set()

    @property
    def verifying(self) -> bool:
        return self.progress.phase == "verifying" and not self._finished

    async def abort(self, who: str = "admin") -> None:
        """Ask libvirt to cancel (``abortJob``); the VM stays on the source.

        Once libvirt has returned and escort is verifying where the VM is, there is
        nothing left to cancel: the same key stops waiting for hosts that do not answer.
        """
        if self.verifying:
            self.stop_waiting(who)
            return
        if self._finished or self.abort_requested:
            return
        self.abort_requested = who
        if self._abort_hook is not None:
            await self._abort_hook(who)

    async def wait(self) -> MigrationResult:
        if self.task is None:
            raise EscortError("migration not started")
        return await asyncio.shield(self.task)


class MigrationService:
    """Pre-flight, run, watch, abort, verify and reconcile migrations of one fleet."""

    def __init__(self, fleet: FleetService, inventory: InventoryService, *,
                 audit: AuditLog | None = None, stall_timeout_s: float | None = None,
                 poll_interval_s: float = POLL_INTERVAL_S, bandwidth_mib_s: int = 0,
                 cert_margin_s: float = 600.0, finish_grace_s: float = FINISH_GRACE_S,
                 settle_s: float = SETTLE_S, clock: Callable[[], float] = time.monotonic,
                 identity: AdminIdentity | None = None, channels: int | None = None) -> None:
        self.fleet = fleet
        #: where the acting admin's key is found (agent, --admin-key, identity files)
        self.identity = identity or AdminIdentity(fleet)
        self.inventory = inventory
        self._audit = audit
        self._owns_audit = audit is None  # close only a log this service opened
        spec_timeout = fleet.spec.stall_timeout_s if fleet.spec else 30.0
        self.stall_timeout_s = stall_timeout_s if stall_timeout_s is not None else spec_timeout
        self.poll_interval_s = poll_interval_s
        self.bandwidth_mib_s = bandwidth_mib_s
        #: multifd TLS connections per migration (0/1: one stream); None: by the guest's
        #: memory (mig.default_channels); docs/MIGRATION.md says why
        self.channels = channels
        self.cert_margin_s = cert_margin_s
        self.finish_grace_s = finish_grace_s
        self.settle_s = settle_s
        self.clock = clock
        self.runs: dict[str, MigrationRun] = {}
        #: id(pre-flight) -> (the pre-flight, emergency): only these authorise start()
        self._issued: dict[int, tuple[mig.Preflight, bool]] = {}
        #: one just-in-time capacity check at a time per target (check + reserve is atomic)
        self._target_locks: dict[str, asyncio.Lock] = {}
        self._reservations: Reservations | None = None
        #: admin -> their proof of possession in this service (signs their audit entries)
        self._proofs: dict[str, AdminProof] = {}
        # migrate3 blocks for a whole migration: its own threads, never the hosts' workers
        self._migrate_threads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="escort-migrate")
        self._poll_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="escort-jobstats")
        self.libvirt_migrate_calls = 0  # tests assert that a refused migration never got here

    # -- audit ----------------------------------------------------------------------
    @property
    def audit(self) -> AuditLog:
        """The fleet's audit log (``audit_log`` in the fleet file), opened on first use."""
        if self._audit is None:
            configured = self.fleet.spec.audit_log if self.fleet.spec else ""
            self._audit = AuditLog(configured or default_audit_path())
        return self._audit

    async def _record(self, entry: Mapping[str, Any], *, must_sign: bool = False) -> dict[str, Any]:
        """Append + fsync in a thread; returns only when the entry is on disk.

        When the entry's admin has proven their key in this service, a ``signature``
        entry (their SSHSIG over this line) follows. ``must_sign``: a signature that
        cannot be made is an error (a decision is signed before anything acts on it);
        otherwise the entry stays unsigned and ``escort audit verify`` says so.
        """
        written: dict[str, Any] = await asyncio.to_thread(self.audit.append, entry)
        proof = self._proofs.get(str(entry.get("admin", "")))
        if proof is not None:
            try:
                await sign_entry(self.audit, written, proof)
            except EscortError:
                if must_sign:
                    raise
        return written

    # -- who acts -------------------------------------------------------------------
    async def prove(self, admin: str | None, action: str) -> AdminProof:
        """Read-only check, then proof that the operator holds ``admin``'s key (refusals audited)."""
        proof = await require_admin(self.fleet, action, admin=admin, identity=self.identity,
                                    audit=self._record,
                                    clock_check=lambda: clock_check_against(self.audit.last_ts))
        self._proofs[proof.admin] = proof
        return proof

    def emergency_basis(self, source: str) -> str:
        """Why emergency-only grants may count for a move off ``source`` now ("" = they may not):
        an emergency declared for it (signed, in the audit log) or the host is down."""
        em = declared(self.fleet, self.audit.path).get(source)
        if em is not None:
            return f"emergency declared for {source} by {em.admin} until {em.end:%Y-%m-%d %H:%M} UTC"
        with contextlib.suppress(InputError):
            view = self._host(source)
            if view.reachability == "down":
                return f"{source} is down ({view.problem.message if view.problem else 'no answer'})"
        return ""

    # -- lookups --------------------------------------------------------------------
    def _vm(self, key: str) -> VMView:
        views = self.fleet.vms()
        hit = [v for v in views if v.uuid == key.lower()] or [v for v in views if v.name == key]
        if not hit:
            raise InputError(f"no VM {key!r} in fleet {self.fleet.name or self.fleet.path}")
        if len(hit) > 1:
            raise InputError(f"{len(hit)} VMs are named {key!r}; use the UUID")
        return hit[0]

    def _host(self, name: str) -> HostView:
        for view in self.fleet.hosts():
            if view.name == name:
                return view
        raise InputError(f"no host {name!r} in fleet {self.fleet.name or self.fleet.path}")

    def _admin(self, admin: str | None) -> str:
        if admin:
            return admin
        admins = self.fleet.admins
        if len(admins) == 1:
            return admins[0].id
        raise InputError("name the admin with --admin (the fleet file lists "
                         f"{len(admins)} admins)" if admins else
                         "the fleet file lists no [[admins]]: a migration needs an admin with a grant")

    def _policy_and_grant(self, vm: VMView, admin: str, at: dt.datetime,
                          emergency: bool = False) -> tuple[str, str]:
        """The policy digest and the id (jti) of the grant the decision relied on."""
        try:
            return self.fleet.audit_ids(vm.uuid, admin, at, emergency=emergency)
        except EscortError:
            return "", ""

    async def _presented_cert(self, spec: HostSpec, view: HostView, *,
                              live: bool = False) -> tuple[x509.Certificate | None, Reason | None]:
        """The certificate QEMU on the target will present, read *now*.

        ``live``: only the file QEMU uses, read over SSH (``remote_cert``) counts — a
        local ``cert_file`` compared with itself would pin nothing. Every non-demo
        pre-flight and every just-in-time check reads live.
        """
        if live and not (spec.ssh and spec.remote_cert):
            return None, Reason("migration.no_remote_cert",
                                f"{spec.name} has no ssh + remote_cert in the fleet file: escort cannot "
                                "read the certificate QEMU there presents, so nothing would pin it",
                                "set remote_cert to the certificate file QEMU uses "
                                "(e.g. /etc/pki/qemu/server-cert.pem)")
        try:
            if spec.ssh and spec.remote_cert:
                data = await self.inventory.pool.read_file(spec.ssh, spec.remote_cert, jump=spec.jump,
                                                           name=spec.name)
                source = f"{spec.name}:{spec.remote_cert}"
            elif spec.cert_file:
                data = await asyncio.to_thread(read_limited, spec.cert_file, what="certificate")
                source = spec.cert_file
            elif view.facts is not None and view.facts.cert_pem:
                data, source = view.facts.cert_pem, f"{spec.name}: certificate"
            else:
                return None, Reason("migration.cert_unreadable",
                                    f"{spec.name}: no way to read its migration certificate",
                                    "set ssh + remote_cert or cert_file for the host in the fleet file")
            return load_certificates(data, source)[0], None
        except EscortError as exc:
            return None, Reason("migration.cert_unreadable", f"{spec.name}: {exc}",
                                "check the host's certificate file and that the host is reachable")

    # -- pre-flight -----------------------------------------------------------------
    async def preflight(self, vm: str, target: str, admin: str | None = None, *,
                        emergency: bool = False, refresh: bool = True) -> mig.Preflight:
        """Every check, all local except reading facts and the target's certificate.

        Changes nothing anywhere (allowed in read-only mode). Refreshes the two hosts
        first so that reachability, the VM's state and the target's room are current;
        ``refresh=False`` is for a caller that has just refreshed them (an evacuation
        planning many moves). ``emergency`` lets emergency-only grants count.
        """
        t0 = time.perf_counter()
        try:
            view = self._vm(vm)
        except InputError:  # not seen yet (a VM started since the last refresh): look everywhere
            for name, r in (await self.inventory.refresh()).items():
                self.fleet.apply_facts(name, r.facts, r.problem)
            view = self._vm(vm)
        admin_id = self._admin(admin)
        tview = self._host(target)
        source = view.host
        live = self.fleet.kind != "demo"
        # The refresh of both hosts and the live read of the certificate the target
        # presents are independent reads: run them at the same time (each host's SSH and
        # libvirt connections are reused from the pool).
        presented_read: asyncio.Task[tuple[x509.Certificate | None, Reason | None]] | None = None
        if live and source != target:
            presented_read = asyncio.ensure_future(self._presented_cert(tview.spec, tview, live=True))
        try:
            if refresh:
                names = list(dict.fromkeys(n for n in (source, target) if n))
                for name, r in (await self.inventory.refresh(names)).items():
                    self.fleet.apply_facts(name, r.facts, r.problem)
            view = self._vm(view.uuid)  # the refresh may have moved it
        except BaseException:
            if presented_read is not None:
                presented_read.cancel()
            raise
        source = view.host
        if source == target:  # judged on the refreshed state, not on what was seen before
            if presented_read is not None:
                presented_read.cancel()
            raise InputError(f"{view.name} already runs on {target}")
        # a pre-flight authorises an action now: it is judged at the real time, never at a
        # time fixed for looking (`--at` of the console/demo). Before, a console opened with
        # --at judged grants, policies and chains at that time here and start() then refused
        # with "the pre-flight is N s old" (or, --at < 60 s back, only the re-check caught it)
        at = dt.datetime.now(dt.UTC)
        # emergency-only grants count only in a declared emergency or with the source down
        emergency = emergency and bool(source) and bool(self.emergency_basis(source))
        sview, tview = self._host(source) if source else None, self._host(target)
        decision = self.fleet.explain(view.uuid, target, admin_id, at, emergency=emergency)
        split = mig.split_decision_reasons(r for r in decision.reasons)
        items: dict[mig.CheckKey, mig.CheckItem] = {}
        reach_from_decision = [r for r in split["allowed"] if r.code == "host.down"]
        split["allowed"] = [r for r in split["allowed"] if r.code != "host.down"]
        items["policy"] = mig.item_from_reasons("policy", split["policy"])
        items["allowed"] = mig.item_from_reasons("allowed", split["allowed"])
        items["grant"] = mig.item_from_reasons("grant", split["grant"])
        checked = tview.chain.leaf.cert if tview.chain and tview.chain.leaf else None
        if presented_read is None:
            presented_read = asyncio.ensure_future(self._presented_cert(tview.spec, tview, live=live))
        presented, why = await presented_read
        duration = mig.expected_duration_s(view.memory_mib, self.bandwidth_mib_s)
        cert_item = mig.check_certificate(checked, presented, at=dt.datetime.now(dt.UTC),
                                          duration_s=duration, margin_s=self.cert_margin_s,
                                          presented_problem=why)
        tls_name = ""
        if checked is not None:
            tls_name, name_problem = mig.tls_name_for(checked, tview.spec.tls_name)
            if name_problem is not None:
                cert_item = mig.CheckItem("certificate", "fail", (*cert_item.reasons, name_problem))
        items["certificate"] = cert_item
        s_up = sview is not None and sview.reachability == "up"
        t_up = tview.reachability == "up"
        reach = mig.check_reachable(source or "source", s_up, sview.problem if sview else None,
                                    target, t_up, tview.problem)
        if not tview.spec.migration_address and self.fleet.kind != "demo":
            reach = mig.CheckItem("reachable", "fail", (*reach.reasons, Reason(
                "migration.no_address", f"{target} has no migration_address in the fleet file",
                "set migration_address (the address QEMU listens on for migrations)")))
        if reach.ok and reach_from_decision:
            reach = mig.failed("reachable", *reach_from_decision)
        items["reachable"] = reach
        sfacts: HostFacts | None = sview.facts if sview else None
        dom = next((d for d in sfacts.domains if d.uuid.lower() == view.uuid), None) if sfacts else None
        if s_up:
            items["running"] = mig.check_running(view.name, source, dom)
        if t_up and tview.facts is not None:
            reserved = sum(r.memory_mib for r in self.runs.values() if r.plan.target == target and not r.done)
            items["capacity"] = mig.check_capacity(
                target, free_memory_mib=_free_memory(tview.facts), cpus=tview.facts.cpus,
                memory_mib=dom.memory_mib if dom else view.memory_mib,
                vcpus=dom.vcpus if dom else view.vcpus, reserved_memory_mib=reserved)
        policy_hash, grant_id = self._policy_and_grant(view, admin_id, at, emergency)
        plan: mig.MigrationPlan | None = None
        if all(i.ok for i in items.values()) and len(items) == len(mig.CHECKS) and presented is not None:
            address = tview.spec.migration_address or target
            plan = mig.MigrationPlan(
                vm_uuid=view.uuid, vm_name=view.name, source=source, target=target, tls_name=tls_name,
                migration_uri=mig.migration_uri(address), cert_fingerprint=mig.fingerprint(presented),
                admin=admin_id, policy_hash=policy_hash, grant_id=grant_id,
                bandwidth_mib_s=self.bandwidth_mib_s,
                channels=self.channels if self.channels is not None else mig.default_channels(
                    dom.memory_mib if dom else view.memory_mib))
        return self._issue(mig.assemble(view.name, view.uuid, source, target, admin_id, at, items, plan,
                                        time.perf_counter() - t0, policy_hash=policy_hash, grant_id=grant_id,
                                        cert_fingerprint=mig.fingerprint(presented) if presented else ""),
                           emergency)

    def _issue(self, pf: mig.Preflight, emergency: bool = False) -> mig.Preflight:
        """Remember ``pf`` as produced here: start() accepts nothing else."""
        while len(self._issued) >= MAX_ISSUED:
            self._issued.pop(next(iter(self._issued)))
        self._issued[id(pf)] = (pf, emergency)
        return pf

    # -- run ------------------------------------------------------------------------
    def _decision_entry(self, run_id: str, pf: mig.Preflight, plan: mig.MigrationPlan | None,
                        **extra: Any) -> dict[str, Any]:
        return {
            "kind": "decision", "run": run_id, "admin": pf.admin, "vm": pf.vm, "uuid": pf.vm_uuid,
            "source": pf.source, "target": pf.target, "allowed": pf.ok and plan is not None,
            "checks": {i.key: i.status for i in pf.items},
            "reasons": [r.as_json() for r in pf.reasons],
            "policy_hash": plan.policy_hash if plan else pf.policy_hash,
            "grant_id": plan.grant_id if plan else pf.grant_id,
            "target_cert_sha256": plan.cert_fingerprint if plan else pf.cert_fingerprint,
            "tls_name": plan.tls_name if plan else "", "uri": plan.migration_uri if plan else "",
            "flags": plan.flag_names() if plan else [], "preflight_s": round(pf.elapsed_s, 4), **extra,
        }

    async def start(self, pf: mig.Preflight, *, proof: AdminProof | None = None) -> MigrationRun:
        """Authorise with a fresh, passing pre-flight; audit (fsynced); start; return at once.

        ``proof``: the acting admin's proof of possession (an evacuation proves once for
        all its moves); without one the admin proves it here, before anything changes.
        """
        self.fleet.require_writable("migration")
        run_id = uuidlib.uuid4().hex[:12]
        issued = self._issued.pop(id(pf), None)
        if issued is None or issued[0] is not pf:
            raise MigrationRefused(f"{pf.vm} -> {pf.target} refused: this pre-flight was not produced by "
                                   "this migration service (or was used already); run the pre-flight again")
        emergency = issued[1]
        if self.fleet.kind != "demo":
            if proof is None:
                proof = await self.prove(pf.admin, f"migrate {pf.vm} to {pf.target}")
            if not is_proof(proof, pf.admin):
                why = AdminNotProven("admin.not_proven", f"no proof that the operator holds admin "
                                     f"{pf.admin}'s key", "prove the admin's key first", pf.admin)
                await self._record({"kind": "refusal", "action": f"migrate {pf.vm} to {pf.target}",
                                    "admin": pf.admin, "code": why.code, "message": why.message})
                raise why
        complete = {i.key for i in pf.items} == {k for k, _ in mig.CHECKS}
        if not pf.ok or pf.plan is None or not complete:  # zero (or some) checks never pass
            await self._record(self._decision_entry(run_id, pf, None))
            raise MigrationRefused(f"{pf.vm} -> {pf.target} refused: "
                                   + "; ".join(r.message for r in pf.reasons[:3])
                                   + (f" (+{len(pf.reasons) - 3} more)" if len(pf.reasons) > 3 else ""))
        if self.fleet.kind == "demo":
            raise MigrationRefused(DEMO_EXPLANATION)
        age = (dt.datetime.now(dt.UTC) - pf.at).total_seconds()
        if age > PREFLIGHT_MAX_AGE_S or age < -5:
            raise MigrationRefused(f"the pre-flight is {int(age)} s old (at most {PREFLIGHT_MAX_AGE_S:g} s); "
                                   "run it again")
        if any(r.plan.vm_uuid == pf.vm_uuid and not r.done for r in self.runs.values()):
            raise MigrationRefused(f"{pf.vm} is already being migrated")
        assert proof is not None
        self._proofs[proof.admin] = proof
        run = await self._launch(run_id, pf, pf.plan,
                                 self._decision_entry(run_id, pf, pf.plan, proof=proof.as_json(),
                                                      emergency=emergency))
        run.emergency = emergency
        return run

    async def _launch(self, run_id: str, pf: mig.Preflight, plan: mig.MigrationPlan,
                      decision: dict[str, Any]) -> MigrationRun:
        self.fleet.require_writable("migration")  # every path that changes something, not only start()
        written = [await self._record(decision, must_sign=True)]  # on disk, signed, before anything changes
        run = MigrationRun(run_id, pf, plan)
        with contextlib.suppress(EscortError):
            run.memory_mib = self._vm(plan.vm_uuid).memory_mib
        self.runs[run_id] = run
        run.task = asyncio.create_task(self._execute(run, written), name=f"migration-{run_id}")
        return run

    async def migrate(self, vm: str, target: str, admin: str | None = None, *,
                      on_progress: ProgressCallback | None = None) -> MigrationResult:
        """Prove the admin's key, pre-flight, then run to the end (the UI uses start())."""
        proof = await self.prove(admin, f"migrate {vm} to {target}")
        pf = await self.preflight(vm, target, proof.admin)
        run = await self.start(pf, proof=proof)
        if on_progress is not None:
            run.subscribe(on_progress)
        return await run.wait()

    async def _execute(self, run: MigrationRun, written: list[dict[str, Any]]) -> MigrationResult:
        plan = run.plan
        t_start = self.clock()
        timings: dict[str, float] = {"preflight": run.preflight.elapsed_s}
        loop = asyncio.get_running_loop()
        outcome: mig.Outcome
        watchdog_fired = False
        try:
            src = await self.inventory.libvirt(plan.source)
            dst = await self.inventory.libvirt(plan.target)
            dom = await src.call(src.conn.lookupByUUIDString, plan.vm_uuid)
            if run.emergency and not self.emergency_basis(plan.source):
                run.emergency = False  # the emergency ended: ordinary grants only
            not_now = await self._just_in_time(run, dst)
            if not_now:
                raise _NotNow(not_now)
            run._publish(run.tracker.start(self.clock()))
            self.libvirt_migrate_calls += 1
            t_mig = self.clock()
            fut = loop.run_in_executor(self._migrate_threads, _migrate3, dom, dst.conn, plan.params(),
                                       plan.flags)

            async def do_abort(who: str) -> None:
                run._publish(run.tracker.set_phase(run.progress.phase, f"abort requested by {who}"))
                job = loop.run_in_executor(self._poll_threads, _abort_job, dom)
                await asyncio.wait({job}, timeout=ABORT_CALL_S)  # an unreachable source must not hang us

            run._abort_hook = do_abort
            dog = mig.StallWatchdog(self.stall_timeout_s, self.clock)
            unstuck = False
            copied = False  # the memory copy is over (switch-over, Finish, Confirm follow)
            pending: asyncio.Future[Any] | None = None
            next_poll = self.clock()
            probe: asyncio.Future[Any] | None = None  # is the target's libvirt still there?
            next_probe = self.clock() + TARGET_PROBE_S
            target_lost = ""  # why escort cancelled the copy itself (the target's libvirt died)
            while not fut.done():
                if pending is None and self.clock() >= next_poll:
                    pending = loop.run_in_executor(self._poll_threads, _sample, dom)
                    next_poll = self.clock() + self.poll_interval_s
                if probe is None and self.clock() >= next_probe and not copied:
                    probe = loop.run_in_executor(self._poll_threads, _probe, dst.conn)
                    next_probe = self.clock() + TARGET_PROBE_S
                if probe is not None and probe.done():
                    lost, probe = probe.result(), None
                    if lost and not copied and not target_lost and not run.abort_requested:
                        # Finish needs the target's libvirtd: without it the copy can only
                        # fail at its end. Cancel it now instead of streaming on for nothing.
                        target_lost = f"{plan.target}'s libvirt stopped answering mid-way ({lost})"
                        run._publish(run.tracker.set_phase(
                            run.progress.phase, f"{target_lost}: cancelling the copy"))
                        job = loop.run_in_executor(self._poll_threads, _abort_job, dom)
                        await asyncio.wait({job}, timeout=ABORT_CALL_S)
                waiters: set[asyncio.Future[Any]] = {fut} if pending is None else {fut, pending}
                await asyncio.wait(waiters, timeout=max(0.01, next_poll - self.clock()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if pending is not None and pending.done():
                    sample, pending = pending.result(), None
                    if sample is not None and not fut.done():
                        stats, paused = sample
                        run._publish(run.tracker.feed(stats, self.clock(), source_paused=paused))
                        copied = copied or _copy_finished(stats)
                    elif sample is None and run.progress.data_total:
                        copied = True  # the source's job is gone after data flowed: switch-over
                if fut.done():
                    break
                # checked on every turn, also while a jobStats call hangs (source unreachable);
                # not once the copy is over: Finish/Confirm send no data, and cutting the
                # target's connection then would turn a good migration into a rollback
                progress = run.progress
                started = bool(progress.data_total)
                if (not copied and dog.observe(progress.data_processed if started else None)
                        and not run.abort_requested):
                    watchdog_fired = True
                    run._publish(run.tracker.set_phase(
                        progress.phase, f"no progress for {self.stall_timeout_s:g} s: aborting"))
                    await run.abort("watchdog")
                if run.abort_requested and not unstuck:
                    unstuck = True
                    await self._unstick(run, fut)
            new_dom, error = await fut
            timings["migrate"] = self.clock() - t_mig
            if target_lost and new_dom is None:
                error = f"{target_lost}; escort cancelled the copy ({error})"
            run._publish(run.tracker.set_phase("verifying", "checking where the VM runs"))
            t_ver = self.clock()
            if new_dom is not None:
                with contextlib.suppress(EscortError):
                    completed = await dst.call(new_dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED,
                                               timeout=3.0)
                    run._publish(run.tracker.complete(completed))
                    run._publish(run.tracker.set_phase("verifying", "checking where the VM runs"))
            fenced = ""
            if new_dom is None and not copied:
                # libvirt resumes a source it had paused for switch-over with the reason
                # "migration canceled": the copy was over although the poller missed it
                with contextlib.suppress(EscortError):
                    state = await src.call(_state_of, src.conn, plan.vm_uuid, timeout=5.0)
                    copied = state == ("running", CANCELLED_REASON)
            if new_dom is None and copied:
                # The copy was over when libvirt failed: the target may have resumed the VM
                # while its answer (Finish) was lost, and libvirt's client then resumes the
                # source too (Confirm "cancelled"). Measured in the lab (link cut just after
                # the target ran the VM): both copies ran. Pause the source first; resume it
                # only once the target has answered that it does not run the VM.
                fenced = await self._fence(run, src)
            seen = await self._observe(run)
            if fenced and seen[1].answered and not seen[1].running:
                await self._unfence(run, src)
                fenced = ""
                seen = await self._observe(run)
            run.fenced = fenced
            outcome = self._conclude(run, seen, libvirt_ok=new_dom is not None, error=error,
                                     watchdog=watchdog_fired)
            timings["verify"] = self.clock() - t_ver
        except _NotNow as exc:  # the just-in-time checks refused: libvirt was not asked
            reasons = exc.reasons
            outcome = mig.Outcome("refused", plan.source,
                                  f"refused just before the migration: {reasons[0].message}"
                                  + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "")
                                  + f"; {plan.vm_name} stays on {plan.source}", reasons,
                                  vm_state="stayed", next_step="run the pre-flight again")
        except EscortError as exc:  # could not even start (host gone between pre-flight and now)
            seen = await self._observe(run)
            outcome = self._conclude(run, seen, libvirt_ok=False, error=str(exc), watchdog=False,
                                     code="migration.not_started")
        except Exception as exc:  # a bug must still leave an outcome, an audit entry, a finished run
            text = f"internal error: {type(exc).__name__}: {exc}"
            outcome = mig.Outcome("failed", "", text, [Reason("migration.internal", text,
                                                              "run reconcile, and report this")],
                                  vm_state="unknown", next_step="run `escort reconcile`, and report this")
            with contextlib.suppress(Exception):
                outcome = self._conclude(run, await self._observe(run), libvirt_ok=False, error=text,
                                         watchdog=False, code="migration.internal")
        await self._release(run)
        timings["total"] = self.clock() - t_start + run.preflight.elapsed_s
        outcome.timings = timings
        if outcome.result == "success":
            run._publish(run.tracker.set_phase("completed", outcome.message) if
                         run.progress.phase != "completed" else run.progress)
        else:
            run._publish(run.tracker.set_phase("aborted" if outcome.result == "aborted" else "failed",
                                               outcome.message))
        entry = {
            "kind": "outcome", "run": run.id, "admin": plan.admin, "vm": plan.vm_name, "uuid": plan.vm_uuid,
            "source": plan.source, "target": plan.target, **outcome.as_json(),
            "target_cert_sha256": plan.cert_fingerprint, "policy_hash": plan.policy_hash,
            "grant_id": plan.grant_id, "tls_name": plan.tls_name, "watchdog": watchdog_fired,
            "aborted_by": run.abort_requested, "data_processed": run.progress.data_processed,
            "stopped_waiting": run.stopped_waiting, "fenced": run.fenced,
        }
        try:
            written.append(await self._record(entry))
        finally:
            result = MigrationResult(run.id, run.preflight, plan, outcome, run.progress, written)
            run.result = result
            run._finish()
        return result

    # -- just in time ---------------------------------------------------------------
    async def _just_in_time(self, run: MigrationRun, dst: LibvirtHost) -> list[Reason]:
        """Immediately before migrate3: every reason not to go now ([] = go).

        The certificate the destination presents *now* (read over SSH) has the planned
        fingerprint and is valid long enough; the grant and the policy still allow the
        move *now* (same policy as pre-flight); the target's free memory *now*, minus
        what migrations already heading there reserved (this process and others),
        holds the VM — and then this migration reserves its memory there.
        """
        # the re-reads (certificate over SSH, free memory over libvirt) run at the same time;
        # the decision is local. A reservation made while another check failed is released.
        cert_task = asyncio.ensure_future(self._jit_certificate(run))
        room_task = asyncio.ensure_future(self._jit_capacity(run, dst))
        try:
            reasons = self._jit_decision(run)
            got = await asyncio.gather(cert_task, room_task)
        except BaseException:
            for task in (cert_task, room_task):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(cert_task, room_task, return_exceptions=True)
            await self._release(run)
            raise
        reasons = got[0] + reasons + got[1]
        if reasons and run.reserved:
            await self._release(run)
        return reasons

    async def _jit_certificate(self, run: MigrationRun) -> list[Reason]:
        plan = run.plan
        spec = self.inventory.spec(plan.target)
        presented, why = await self._presented_cert(spec, self._host(plan.target), live=True)
        if presented is None:
            return [why] if why is not None else []
        fp = mig.fingerprint(presented)
        if fp != plan.cert_fingerprint:
            return [Reason("migration.cert_changed",
                           f"{plan.target} now presents another certificate (SHA-256 {fp[:16]}…) than the "
                           f"one checked at pre-flight ({plan.cert_fingerprint[:16]}…)",
                           "find out why the certificate changed, then run the pre-flight again")]
        duration = mig.expected_duration_s(run.memory_mib, self.bandwidth_mib_s)
        item = mig.check_certificate(presented, presented, at=dt.datetime.now(dt.UTC), duration_s=duration,
                                     margin_s=self.cert_margin_s)
        return [r for r in item.reasons if r.severity == "error"]

    def _jit_decision(self, run: MigrationRun) -> list[Reason]:
        plan = run.plan
        now = dt.datetime.now(dt.UTC)
        try:
            decision = self.fleet.explain(plan.vm_uuid, plan.target, plan.admin, now, emergency=run.emergency)
        except EscortError as exc:
            return [Reason("migration.recheck_failed", f"the decision could not be re-checked: {exc}",
                           "run the pre-flight again")]
        reasons = [r for r in decision.reasons if r.severity == "error"] if not decision.allowed else []
        if not decision.allowed and not reasons:
            reasons = [Reason("migration.not_allowed_now",
                              f"{plan.vm_name} may no longer move to {plan.target}")]
        policy_hash, _ = self._policy_and_grant(self._vm(plan.vm_uuid), plan.admin, now, run.emergency)
        if plan.policy_hash and policy_hash != plan.policy_hash:
            reasons.append(Reason("migration.policy_changed",
                                  f"{plan.vm_name}'s policy changed since the pre-flight",
                                  "run the pre-flight again (the owner's new policy decides)"))
        return reasons

    def _reservations_file(self) -> Reservations | None:
        if self._reservations is None:
            with contextlib.suppress(Exception):
                path = self.audit.path
                self._reservations = Reservations(path.with_name(path.name + ".reservations"))
        return self._reservations

    async def _jit_capacity(self, run: MigrationRun, dst: LibvirtHost) -> list[Reason]:
        plan = run.plan
        need = run.memory_mib
        if need <= 0:
            return []  # unknown size: the pre-flight's capacity check is all there is
        lock = self._target_locks.setdefault(plan.target, asyncio.Lock())
        async with lock:
            try:
                # the same bound as the planner and the pre-flight: memory the target's active
                # domains were given counts as taken even while the kernel still sees it free
                free = _free_memory(await dst.call(read_host_facts, dst.conn))
            except EscortError as exc:
                return [Reason("migration.capacity_unknown", f"{plan.target}: free memory unreadable ({exc})",
                               "check the target host")]
            # the reservations file counts every migration heading there (this service, other
            # services in this process, other processes); without it, this service's own runs
            here = sum(r.memory_mib for r in self.runs.values()
                       if r.plan.target == plan.target and r.reserved and not r.done and r is not run)
            seen: list[int] = []

            def fits(promised: int) -> bool:
                seen.append(promised)
                return free - promised >= need

            shared = self._reservations_file()
            ok = False
            if shared is not None:
                try:
                    ok = await asyncio.to_thread(shared.reserve, run.id, plan.target, need, fits)
                except OSError:
                    shared = None
            if shared is None:
                ok = fits(here)
            if not ok:
                promised = seen[-1] if seen else here
                return [Reason("migration.no_memory",
                               f"{plan.target} has {free} MiB free, {promised} MiB of it promised to "
                               f"migrations already heading there; {plan.vm_name} needs {need} MiB",
                               "wait for those migrations, or choose another target")]
            run.reserved = True
        return []

    async def _release(self, run: MigrationRun) -> None:
        if not run.reserved:
            return
        run.reserved = False
        shared = self._reservations_file()
        if shared is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shared.release, run.id)

    async def _unstick(self, run: MigrationRun, fut: asyncio.Future[Any]) -> None:
        """After an abort libvirt still calls Finish on the target; over a dead link that
        waits for TCP. Give it ``finish_grace_s``, then close our connection to the
        target: libvirt's client sees EOF at once, unwinds, and the source keeps the VM."""
        done, _ = await asyncio.wait({fut}, timeout=self.finish_grace_s)
        if done:
            return
        run._publish(run.tracker.set_phase(run.progress.phase,
                                           "target not answering: closing its connection"))
        # first the target (a dead migration link), then, if libvirt is still stuck, the
        # source (its own link died and Perform waits on it)
        for name in (run.plan.target, run.plan.source):
            spec = self.inventory.spec(name)
            if spec.ssh:  # the forwarded libvirt socket rides on it: libvirt sees EOF
                with contextlib.suppress(Exception):
                    await self.inventory.pool.drop(spec.ssh, spec.jump)
            done, _ = await asyncio.wait({fut}, timeout=self.finish_grace_s)
            if done:
                return
        await asyncio.wait({fut}, timeout=30.0)

    async def _fence(self, run: MigrationRun, src: Any) -> str:
        """Pause the source's copy if it runs; returns the host name when it did."""
        run._publish(run.tracker.set_phase("verifying", f"the copy was over when libvirt failed: pausing "
                                           f"{run.plan.vm_name} on {run.plan.source} until "
                                           f"{run.plan.target} says it does not run it"))
        try:
            paused = await src.call(_suspend_if_running, src.conn, run.plan.vm_uuid, timeout=5.0)
        except EscortError:
            return ""  # the source cannot be asked either: its libvirtd keeps it paused itself
        if paused:
            with contextlib.suppress(Exception):
                await self._record({"kind": "fence", "run": run.id, "admin": run.plan.admin,
                                    "vm": run.plan.vm_name,
                                    "uuid": run.plan.vm_uuid, "host": run.plan.source, "action": "pause",
                                    "why": "the copy was over when libvirt failed; the target may run it"})
        return run.plan.source if paused else ""

    async def _unfence(self, run: MigrationRun, src: Any) -> None:
        with contextlib.suppress(EscortError):
            await src.call(_resume_if_paused, src.conn, run.plan.vm_uuid, timeout=5.0)
            await self._record({"kind": "fence", "run": run.id, "admin": run.plan.admin,
                                    "vm": run.plan.vm_name,
                                "uuid": run.plan.vm_uuid, "host": run.plan.source, "action": "resume",
                                "why": f"{run.plan.target} answered: it does not run the VM"})

    async def _ask(self, name: str, role: mig.Role, uuid: str) -> mig.HostSeen:
        """One host's answer: the VM's state there, or why the host could not be asked."""
        try:
            host = await self.inventory.libvirt(name)
            facts = await host.call(_domain_facts, host.conn, uuid, timeout=VERIFY_CALL_S)
        except EscortError as exc:
            code = getattr(exc, "code", "")
            return mig.HostSeen(name, role, False, problem=str(exc).removeprefix(f"{name}: "),
                                gone=code in _GONE_CODES)
        return mig.HostSeen(name, role, True, facts)

    async def _observe(self, run: MigrationRun) -> tuple[mig.HostSeen, mig.HostSeen]:
        """Ask both hosts where the VM is, concurrently, until each gave a final answer.

        A final answer: the host answered (and holds no unfinished incoming copy that
        libvirt is still removing), or it is known to be gone (daemon down, refused).
        Returns as soon as both are final; otherwise at the deadline (``settle_s``) or
        when the operator stops waiting, with the silent host(s) marked unknown. The
        progress message says whom we wait for, with a countdown.
        """
        plan = run.plan
        roles: dict[str, mig.Role] = {plan.source: "source", plan.target: "target"}
        start = self.clock()
        deadline = start + self.settle_s
        latest: dict[str, mig.HostSeen] = {}
        tasks: dict[str, asyncio.Task[mig.HostSeen]] = {}
        next_ask = dict.fromkeys(roles, start)

        def final(seen: mig.HostSeen | None) -> bool:
            if seen is None:
                return False
            if not seen.answered:
                return seen.gone
            unfinished = (seen.role == "target" and seen.copy is not None and not seen.running
                          and not seen.copy.persistent)
            return not unfinished

        try:
            while True:
                now = self.clock()
                for name, role in roles.items():
                    if name not in tasks and not final(latest.get(name)) and now >= next_ask[name]:
                        tasks[name] = asyncio.create_task(self._ask(name, role, plan.vm_uuid))
                if all(final(latest.get(n)) for n in roles) or now >= deadline or run._stop_wait.is_set():
                    break
                waiting = [n for n in roles if not final(latest.get(n))]
                left = max(0.0, deadline - now)
                why = "; ".join(f"{n}: {latest[n].problem or latest[n].state}" if n in latest else
                                f"{n}: no answer yet" for n in waiting)
                run._publish(run.tracker.set_phase(
                    "verifying", f"waiting for {' and '.join(waiting)} ({why}) — {left:.0f} s left; "
                    "stop waiting: a (console) / Ctrl-C (CLI)"))
                stop = asyncio.ensure_future(run._stop_wait.wait())
                try:
                    await asyncio.wait({*tasks.values(), stop}, timeout=min(VERIFY_POLL_S, left),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                for name, task in list(tasks.items()):
                    if task.done():
                        latest[name] = task.result()
                        del tasks[name]
                        next_ask[name] = self.clock() + VERIFY_POLL_S
        finally:
            for task in tasks.values():
                task.cancel()
        waited = self.clock() - start
        for name, role in roles.items():
            seen = latest.get(name)
            if seen is not None and (seen.answered or seen.gone):
                continue
            last = f" (last: {seen.problem})" if seen is not None and seen.problem else ""
            what = (f"{run.stopped_waiting} stopped waiting after {waited:.0f} s" if run.stopped_waiting
                    else f"no answer within {waited:.0f} s")
            latest[name] = mig.HostSeen(name, role, False, problem=what + last)
        return latest[plan.source], latest[plan.target]

    def _conclude(self, run: MigrationRun, seen: tuple[mig.HostSeen, mig.HostSeen], *, libvirt_ok: bool,
                  error: str, watchdog: bool, code: str = "") -> mig.Outcome:
        """The outcome: what libvirt said, and where the VM is as far as it was verified."""
        plan = run.plan
        source, target = seen
        verdict = mig.judge(plan.vm_name, source, target, libvirt_ok=libvirt_ok,
                            copy_started=bool(run.progress.data_total or run.progress.data_processed))
        reasons: list[Reason] = []
        if libvirt_ok:
            cause = "libvirt reported the migration complete"
        elif code:
            reasons.append(Reason(code, error, "check the hosts, then run `escort reconcile`"))
            cause = error
        elif watchdog:
            reasons.append(Reason("migration.stalled", f"no progress for {self.stall_timeout_s:g} s "
                                  f"(link down?); aborted: {error}",
                                  "check the migration network between the hosts"))
            cause = reasons[0].message
        elif run.abort_requested:
            reasons.append(Reason("migration.aborted", f"aborted by {run.abort_requested}: {error}"))
            cause = reasons[0].message
        else:
            reasons.append(guard_refusal(error, plan.target)
                           or Reason("migration.failed", error, _fix_for(error)))
            cause = reasons[0].message
        paused = self._paused_warning(plan, source)
        if run.fenced:
            reasons.append(Reason(
                "migration.fenced", f"escort paused {plan.vm_name} on {plan.source}: the copy was over when "
                f"libvirt failed, so {plan.target} may be running it (its answer was lost)",
                f"when {plan.target} answers: if it runs the VM, `escort reconcile` removes the paused "
                f"copy on {plan.source}; if not, it resumes it there"))
        elif paused:
            reasons.append(paused)
        for h in seen:
            if not h.answered:
                reasons.append(Reason("migration.host_unverified",
                                      f"{h.host} could not be asked: {h.problem}",
                                      f"check {h.host} (SSH, libvirtd), then run `escort reconcile`"))
        if verdict.needs_reconcile:
            reasons.append(Reason("migration.needs_reconcile", verdict.summary,
                                  verdict.next_step or "run `escort reconcile`"))
        result: Any
        if verdict.vm_state == "moved":
            result = "success"
            message = verdict.summary if libvirt_ok else (
                f"{verdict.summary}; libvirt reported an error after the switch-over: {error}")
            if run.abort_requested and not libvirt_ok:
                message += f" (the abort by {run.abort_requested} came too late)"
        elif verdict.vm_state == "stayed":
            result = "aborted" if run.abort_requested and not watchdog else "failed"
            message = f"{cause}. {verdict.summary}"
        else:
            result = "unknown"
            message = f"{cause}. {verdict.summary}"
        if run.fenced:
            message += "".join(f". {r.message}" for r in reasons if r.code == "migration.fenced")
        if verdict.next_step:
            message += f". Next: {verdict.next_step}"
        return mig.Outcome(result, verdict.vm_on, message, reasons, downtime_ms=run.progress.downtime_ms,
                           vm_state=verdict.vm_state, hosts=list(seen), next_step=verdict.next_step)

    def _paused_warning(self, plan: mig.MigrationPlan, source: mig.HostSeen) -> Reason | None:
        """libvirt's "probably left in 'paused' state on source", checked against the real state."""
        if source.answered and source.copy is not None and source.copy.state == "paused":
            why = f" ({source.copy.state_reason})" if source.copy.state_reason else ""
            return Reason("migration.source_paused",
                          f"{plan.vm_name} is paused{why} on {plan.source} (checked)",
                          "run `escort reconcile`: it resumes the right copy, never both")
        return None

    # -- reconcile ------------------------------------------------------------------
    async def reconcile_scan(self, hosts: list[str] | None = None) -> list[mig.ReconcileCase]:
        """Refresh hosts and list VMs a migration left half-done (paused for migration,
        or on two hosts). Run at start and after every lost connection."""
        refreshed = await self.inventory.refresh(hosts)
        for name, r in refreshed.items():
            self.fleet.apply_facts(name, r.facts, r.problem)
        fenced = self._fenced()
        domains = {n: [replace(d, state_reason="migration") if (d.uuid, n) in fenced and d.state == "paused"
                       else d for d in r.facts.domains]
                   for n, r in refreshed.items() if r.facts is not None}
        return mig.find_reconcile_cases(domains, self._last_targets())

    def _fenced(self) -> set[tuple[str, str]]:
        """(uuid, host) pairs escort paused after a lost Finish and nobody reconciled since:
        reconcile treats them as paused for the migration (resume, or remove if the other runs)."""
        out: set[tuple[str, str]] = set()
        try:
            for e in read_entries(self.audit.path):
                key = (str(e.get("uuid")), str(e.get("host")))
                if e.get("kind") == "fence":
                    (out.add if e.get("action") == "pause" else out.discard)(key)
                elif e.get("kind") == "reconcile":
                    out = {k for k in out if k[0] != str(e.get("uuid"))}
        except EscortError:
            return set()
        return out

    def unverified(self) -> list[dict[str, Any]]:
        """Migrations whose latest outcome in the audit log is "unknown" (a host could not
        be asked): each is offered again until a reconcile scan sees both hosts."""
        latest: dict[str, dict[str, Any]] = {}
        try:
            for e in read_entries(self.audit.path):
                if e.get("kind") == "outcome":
                    latest[str(e.get("uuid"))] = e
        except EscortError:
            return []
        return [e for e in latest.values() if e.get("vm_state") == "unknown"]

    def _last_targets(self) -> dict[str, str]:
        path = self.audit.path
        out: dict[str, str] = {}
        try:
            for e in read_entries(path):
                if e.get("kind") == "outcome" and e.get("result") == "success":
                    out[str(e.get("uuid"))] = str(e.get("target"))
        except EscortError:
            pass
        return out

    async def resolve(self, case: mig.ReconcileCase, admin: str | None = None, *,
                      proof: AdminProof | None = None) -> list[str]:
        """Carry out a case's safe steps (audited first); returns what was done."""
        self.fleet.require_writable("reconcile")
        if not case.steps:
            raise EscortError(f"{case.name}: no automatic resolution ({case.advice})")
        if proof is None or not is_proof(proof, admin):
            proof = await self.prove(admin, f"reconcile {case.name}")
        admin = proof.admin
        self._proofs[admin] = proof
        action = f"reconcile {case.name}"
        # the fix destroys, undefines or resumes the owner's VM: it needs their grant, like a move
        try:
            _, grant_id = self.fleet.audit_ids(case.uuid, admin, dt.datetime.now(dt.UTC))
        except EscortError:
            grant_id = ""
        if not grant_id:
            await self._refuse(action, admin, Reason(
                "reconcile.no_grant", f"admin {admin} holds no grant covering {case.name}",
                "ask the VM's owner for a grant: the fix changes their VM"))
        # right before acting: the VM's state on every host involved, read again now
        now = await self._reread(case)
        changed = _changed_since_scan(case, now)
        if changed:
            await self._refuse(action, admin, Reason(
                "reconcile.state_changed", f"{case.name} changed since the scan ({changed})",
                "scan again (the console does after every refresh) and decide on what is there now"))
        await self._record({"kind": "reconcile", "admin": admin, "proof": proof.as_json(), "vm": case.name,
                            "uuid": case.uuid, "code": case.code, "grant_id": grant_id,
                            "copies": [c.describe() for c in case.copies],
                            "steps": [list(s) for s in case.steps]}, must_sign=True)
        done: list[str] = []
        for action, host_name in case.steps:
            host = await self.inventory.libvirt(host_name)
            await host.call(_apply_step, host.conn, case.uuid, action)
            done.append(f"{action} on {host_name}")
        return done

    async def _refuse(self, action: str, admin: str, why: Reason) -> None:
        await self._record({"kind": "refusal", "action": action, "admin": admin, "code": why.code,
                            "message": why.message})
        raise ReconcileRefused(f"refused ({why.code}): {why.message}; fix: {why.fix}; nothing was changed")

    async def _reread(self, case: mig.ReconcileCase) -> dict[str, DomainFacts | str | None]:
        """host -> the VM's facts there now (None: not defined; str: could not ask)."""
        hosts = sorted({c.host for c in case.copies} | {h for _, h in case.steps})
        out: dict[str, DomainFacts | str | None] = {}
        for name in hosts:
            try:
                host = await self.inventory.libvirt(name)
                out[name] = await host.call(_domain_facts, host.conn, case.uuid)
            except EscortError as exc:
                out[name] = str(exc)
        return out

    async def close(self) -> None:
        for run in list(self.runs.values()):
            if run.task is not None and not run.task.done():
                await run.abort("console closing")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(run.task), 30)
        self._migrate_threads.shutdown(wait=False)
        self._poll_threads.shutdown(wait=False)
        if self._audit is not None and self._owns_audit:
            self._audit.close()


def _changed_since_scan(case: mig.ReconcileCase, now: Mapping[str, DomainFacts | str | None]) -> str:
    """"" when every host still shows what the scan saw (state and persistence), else what changed."""
    diffs: list[str] = []
    seen = {c.host: c for c in case.copies}
    for host, facts in now.items():
        before = seen.get(host)
        if isinstance(facts, str):
            diffs.append(f"{host} could not be asked: {facts}")
        elif facts is None:
            if before is not None:
                diffs.append(f"gone from {host}")
        elif before is None:
            diffs.append(f"now {facts.state} on {host}")
        elif facts.state != before.state or facts.persistent != before.persistent:
            diffs.append(f"{before.state} -> {facts.state} on {host}")
    return "; ".join(diffs)


class _NotNow(Exception):
    def __init__(self, reasons: list[Reason]) -> None:
        super().__init__(reasons[0].message if reasons else "refused")
        self.reasons = reasons


# -- blocking helpers (run in threads) -------------------------------------------------
def _migrate3(dom: Any, dconn: Any, params: dict[str, Any], flags: int) -> tuple[Any, str]:
    """(new domain, "") or (None, libvirt's message): never raises."""
    try:
        return dom.migrate3(dconn, params, flags), ""
    except libvirt.libvirtError as exc:
        return None, libvirt_message(exc)


def _abort_job(dom: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        dom.abortJob()


def _sample(dom: Any) -> tuple[dict[str, Any], bool] | None:
    """(jobStats, False) or None when the job/domain is gone.

    Only ``jobStats``: measured in the lab (libvirt 9.0), a ``virDomainGetState`` right
    after it on the same connection blocked until the end of the migration's copy
    phase (7 s of a 9 s migration), starving the progress display. So switch-over is
    not detected from the domain state; the phase goes copying/converging -> verifying.
    """
    try:
        stats = dom.jobStats()
    except libvirt.libvirtError:
        return None
    return stats, False


def _state_of(conn: Any, uuid: str) -> tuple[str, str]:
    from console.adapters.libvirt import state_name

    state, reason = conn.lookupByUUIDString(uuid).state()
    return state_name(state, reason)


def _suspend_if_running(conn: Any, uuid: str) -> bool:
    dom = conn.lookupByUUIDString(uuid)
    if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
        dom.suspend()
        return True
    return False


def _resume_if_paused(conn: Any, uuid: str) -> None:
    dom = conn.lookupByUUIDString(uuid)
    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()


def _probe(conn: Any) -> str:
    """"" while the connection's daemon answers, else libvirt's message (one cheap RPC)."""
    try:
        conn.getLibVersion()
    except libvirt.libvirtError as exc:
        return libvirt_message(exc)
    return ""


def _copy_finished(stats: dict[str, Any]) -> bool:
    """The source's job says the memory copy is over (completed, or nothing left to send)."""
    kind = stats.get("type")
    if kind in (mig.JOB_COMPLETED, mig.JOB_FAILED, mig.JOB_CANCELLED):
        return True
    total, remaining = stats.get("data_total") or 0, stats.get("data_remaining")
    return bool(total) and remaining == 0


def _domain_facts(conn: Any, uuid: str) -> DomainFacts | None:
    from console.adapters.libvirt import state_name

    try:
        dom = conn.lookupByUUIDString(uuid)
        state, reason = dom.state()
        persistent = bool(dom.isPersistent())
        name = dom.name()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    text, why = state_name(state, reason)
    return DomainFacts(uuid, name, text, why, persistent=persistent)


def _apply_step(conn: Any, uuid: str, action: str) -> None:
    dom = conn.lookupByUUIDString(uuid)
    if action == "destroy":
        if dom.isActive():
            dom.destroy()
    elif action == "resume":
        dom.resume()
    elif action == "undefine":
        if dom.isPersistent():
            dom.undefine()
    else:  # pragma: no cover - steps come from core.migration only
        raise EscortError(f"unknown reconcile step {action!r}")


def _free_memory(facts: HostFacts) -> int:
    """Room on the host as the evacuation planner counts it (``core.evacuation.memory_room``):
    the smaller of the kernel's free memory and the host's memory minus what its active
    domains were given; when libvirt cannot report free memory (the test driver says 0),
    the second bound alone."""
    return memory_room(facts, kernel_free=facts.free_memory_mib > 0)


def _fix_for(error: str) -> str:
    low = error.lower()
    if "known issuer" in low or "certificate" in low:
        return "the target's TLS certificate was refused by QEMU: check its CA and name"
    if "tls channel" in low or "end of file" in low:
        return "the target or the link went away mid-way; check the target host"
    return ""


__all__ = [
    "DEMO_EXPLANATION",
    "MigrationFailed",
    "MigrationRefused",
    "MigrationResult",
    "MigrationRun",
    "MigrationService",
    "ReconcileRefused",
    "default_audit_path",
]
