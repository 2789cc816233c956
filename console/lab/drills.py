"""One outage drill, end to end: migrate a filled guest, inject a fault at a chosen
moment, heal, and compare what escort reported with where the VM really is.

Used by the lab tests (tests/integration/test_faults_lab.py) and the stress script
(bench/bench_faults.py), so both run exactly the same scenario. The truth is read from
each hypervisor's own libvirt socket (not through escort), after the fault is healed.

Moments (all observed, none timed):
* ``prepare``: the target's incoming QEMU exists (its PID file appeared), before the
  copy is under way;
* ``mid-copy``: the source's job reports a third of the memory sent;
* ``after``: the target's copy runs (Finish resumed it): the migration just completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from console.core.errors import EscortError

from . import faults

if TYPE_CHECKING:
    from console.core import migration as mig

    from . import Lab

FAULT_MATRIX = ("kill-libvirtd", "kill-qemu", "kill-sshd", "cut-link")
MOMENTS = ("prepare", "mid-copy", "after")
SOURCE = "fra-1"
TARGET = "par-1"


@dataclass
class DrillResult:
    fault: str
    moment: str
    vm: str
    uuid: str
    fired: bool = False  # the fault was injected at the moment (False: the moment never came)
    fired_note: str = ""
    result: str = ""
    vm_state: str = ""
    vm_on: str = ""
    message: str = ""
    hosts: list[dict[str, Any]] = field(default_factory=list)
    truth: dict[str, str] = field(default_factory=dict)  # host -> "running"/"shut off"/...
    reconciled: list[str] = field(default_factory=list)  # cases offered (and fixed) after healing
    unverified_listed: bool = False  # an unknown outcome is offered again by reconcile
    audit_ok: bool = False
    problems: list[str] = field(default_factory=list)  # why it counts as wrong

    @property
    def running_on(self) -> list[str]:
        return sorted(h for h, s in self.truth.items() if s == "running")

    @property
    def lost(self) -> bool:
        """Defined nowhere, or running nowhere (unless the drill itself killed the migrated VM)."""
        if not self.truth:
            return True
        return not self.running_on and not (self.fault == "kill-qemu" and self.moment == "after")

    @property
    def doubled(self) -> bool:
        return len(self.truth) > 1 or len(self.running_on) > 1

    @property
    def wrong(self) -> bool:
        return bool(self.problems)

    def as_json(self) -> dict[str, Any]:
        return {"fault": self.fault, "moment": self.moment, "vm": self.vm, "fired": self.fired,
                "fired_note": self.fired_note, "result": self.result, "vm_state": self.vm_state,
                "vm_on": self.vm_on, "hosts": self.hosts, "truth": self.truth, "lost": self.lost,
                "doubled": self.doubled, "wrong": self.wrong, "problems": self.problems,
                "reconciled": self.reconciled, "audit_ok": self.audit_ok, "message": self.message}


def fault_host(fault: str) -> str:
    return "jump" if fault == "kill-sshd" else TARGET


def _heal(lab: Lab, fault: str) -> None:
    host = fault_host(fault)
    action = {"kill-libvirtd": "restart", "kill-sshd": "restart", "cut-link": "heal-link"}.get(fault)
    if action:
        with contextlib.suppress(faults.FaultRefused):
            faults.inject(lab, action, host)


def truth(lab: Lab, uuid: str) -> dict[str, str]:
    """host -> state (with ", transient" for a non-persistent copy), from each libvirtd."""
    import libvirt

    from console.adapters.libvirt import state_name

    out: dict[str, str] = {}
    for host in lab.hypervisors:
        conn = lab.open_libvirt(host)
        try:
            dom = conn.lookupByUUIDString(uuid)
            state, reason = dom.state()
            text, why = state_name(state, reason)
            out[host] = text if text in ("running", "shut off") else f"{text} ({why})"
            if not dom.isPersistent():
                out[host] += ", transient"
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return out


def _settled(states: dict[str, str]) -> bool:
    """No unfinished incoming copy left for libvirt itself to remove, nothing mid-way
    (a copy "shutting down" is being removed by libvirt right now)."""
    return all(not s.endswith("transient") and s.split(" (")[0] in ("running", "shut off", "paused")
               for s in states.values())


def _qemu_started(pid_file: Path) -> bool:
    """The target's incoming QEMU exists: its PID file names a live process called qemu*."""
    from . import netns

    pid = netns.read_pid(pid_file)
    return pid is not None and netns.pid_alive(pid) and faults._comm(pid).startswith("qemu")


async def _trigger(lab: Lab, run: Any, moment: str, vm: str, uuid: str) -> str:
    """Wait for the moment; returns what was observed ("" when the run ended first)."""
    import libvirt

    pid_file = lab.host(TARGET).root / "run" / "libvirt" / "qemu" / f"{vm}.pid"
    conn = await asyncio.to_thread(lab.open_libvirt, TARGET) if moment == "after" else None

    def target_running() -> bool:
        assert conn is not None
        try:
            return bool(conn.lookupByUUIDString(uuid).state()[0] == libvirt.VIR_DOMAIN_RUNNING)
        except libvirt.libvirtError:
            return False

    try:
        while not run.done:
            p = run.progress
            if moment == "prepare" and _qemu_started(pid_file):
                return f"target QEMU started, {p.data_processed} bytes sent"
            if moment == "mid-copy" and p.data_total and p.data_processed * 3 >= p.data_total:
                return f"{p.data_processed} of {p.data_total} bytes sent"
            if moment == "after" and await asyncio.to_thread(target_running):
                return "the target runs the VM"
            await asyncio.sleep(0.02)
        return ""
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def check_report(r: DrillResult, outcome: mig.Outcome) -> list[str]:
    """Does what escort said match the truth (read after healing)? Reasons it does not."""
    problems: list[str] = []
    running = r.running_on
    if outcome.vm_state == "moved" and running != [TARGET] and not (r.fault == "kill-qemu" and
                                                                      r.moment == "after"):
        problems.append(f"reported moved, but it runs on {running or 'no host'}")
    if outcome.vm_state == "stayed" and running != [SOURCE]:
        problems.append(f"reported stayed, but it runs on {running or 'no host'}")
    if outcome.vm_state not in ("moved", "stayed", "unknown"):
        problems.append(f"no three-valued state ({outcome.vm_state!r})")
    silent = [h for h in outcome.hosts if not h.answered]
    if outcome.vm_state == "unknown" and not silent and running in ([SOURCE], [TARGET]) and \
            r.fault != "kill-qemu":
        problems.append("reported unknown although both hosts answered and it runs on one")
    if silent and "not running" in outcome.message:
        problems.append("said 'not running' about a host it could not ask")
    for h in outcome.hosts:
        if h.answered and h.running and h.host not in running and not r.fault.startswith("kill-qemu"):
            problems.append(f"reported running on {h.host} (checked), but it is not")
    if outcome.result == "success" and outcome.vm_state != "moved":
        problems.append("result success without a verified move")
    return problems


async def run_drill(lab: Lab, fault: str, moment: str, *, fleet_file: Path, audit_path: Path,
                    name: str, fill_mib: int = 32, bandwidth_mib_s: int = 6, settle_s: float = 8.0,
                    stall_timeout_s: float = 4.0, log: Callable[[str], None] | None = None) -> DrillResult:
    """Add a guest on SOURCE, migrate it to TARGET, inject ``fault`` at ``moment``, heal,
    compare, reconcile, remove the guest. Never raises for the scenario's own failures."""
    import time

    from console.adapters.audit import AuditLog, verify_file
    from console.services.fleet import FleetService
    from console.services.inventory import InventoryService, pool_for
    from console.services.migration import MigrationService

    t0 = time.monotonic()
    base_say = log or (lambda _m: None)

    def say(msg: str) -> None:
        base_say(f"[{time.monotonic() - t0:6.1f} s] {msg}")

    added = await asyncio.to_thread(faults.add_guest, lab, name, SOURCE, memory_mib=fill_mib + 32,
                                    fill_mib=fill_mib)
    r = DrillResult(fault, moment, name, str(added["uuid"]))
    say(f"guest {name} added")
    fleet = FleetService.load_strict(fleet_file)
    assert fleet.spec is not None
    # SSH keepalive 2 s x 2 (escort's default is 15 s x 3): a cut link is noticed in
    # seconds, so a drill takes less time; the product's behaviour is otherwise the same
    inventory = InventoryService(fleet.spec, apply=fleet.apply_facts,
                                 pool=pool_for(fleet.spec, keepalive_interval=2.0, keepalive_count_max=2))
    audit = AuditLog(audit_path)
    svc = MigrationService(fleet, inventory, audit=audit, bandwidth_mib_s=bandwidth_mib_s,
                           settle_s=settle_s, stall_timeout_s=stall_timeout_s, finish_grace_s=3.0)
    try:
        await inventory.refresh([SOURCE, TARGET])  # only the two hosts (the VM is new to the fleet)
        pf = await svc.preflight(name, TARGET, faults_admin(fleet_file), refresh=False)
        if not pf.ok:
            r.problems.append("pre-flight refused: " + "; ".join(x.message for x in pf.reasons))
            return r
        say("pre-flight passed")
        run = await svc.start(pf)
        observed = await _trigger(lab, run, moment, name, r.uuid)
        if observed:
            try:
                await asyncio.to_thread(faults.inject, lab, fault, fault_host(fault),
                                        name if fault == "kill-qemu" else "")
                r.fired, r.fired_note = True, observed
            except EscortError as exc:
                r.fired_note = f"{observed}; fault not injected: {exc}"
        else:
            r.fired_note = "the migration ended before the moment came"
        say(f"fault: {r.fired_note}")
        result = await run.wait()
        out = result.outcome
        r.result, r.vm_state, r.vm_on, r.message = out.result, out.vm_state, out.vm_on, out.message
        r.hosts = [h.as_json() for h in out.hosts]
        say(f"{fault} at {moment}: {out.result}/{out.vm_state} — {out.message[:200]}")
        await asyncio.to_thread(_heal, lab, fault)
        say("healed")
        # libvirt removes an unfinished incoming copy on its own (when its client went away,
        # or when a restarted daemon finds it); wait for that, observed, then ask reconcile
        for _ in range(150):
            r.truth = await asyncio.to_thread(truth, lab, r.uuid)
            if _settled(r.truth):
                break
            await asyncio.sleep(0.2)
        cases = [c for c in await svc.reconcile_scan([SOURCE, TARGET]) if c.uuid == r.uuid]
        for case in cases:
            r.reconciled.append(case.code)
            if case.steps:
                await svc.resolve(case, faults_admin(fleet_file))
        r.truth = await asyncio.to_thread(truth, lab, r.uuid)
        say(f"truth {r.truth}, reconcile {r.reconciled}")
        r.problems += check_report(r, out)
        if out.vm_state == "unknown":
            r.unverified_listed = any(e.get("uuid") == r.uuid for e in svc.unverified())
            if not r.unverified_listed:
                r.problems.append("an unknown outcome is not offered again by reconcile")
        r.audit_ok = verify_file(audit_path).ok and verify_file(lab.dir / "audit.log").ok
        if not r.audit_ok:
            r.problems.append("audit log does not verify")
        return r
    finally:
        with contextlib.suppress(Exception):
            await svc.close()
        with contextlib.suppress(Exception):
            await inventory.close()
        audit.close()
        await asyncio.to_thread(_heal, lab, fault)
        with contextlib.suppress(Exception):  # clean-up: the result is already complete
            await asyncio.to_thread(faults.remove_guest, lab, name)


def faults_admin(fleet_file: Path) -> str:
    doc = tomllib.loads(fleet_file.read_text(encoding="utf-8"))
    return str(doc["admins"][0]["id"])


__all__ = ["FAULT_MATRIX", "MOMENTS", "DrillResult", "check_report", "run_drill", "truth"]
