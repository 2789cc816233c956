"""Evacuation on the lab: real hosts through the jump host, real TLS migrations, real capacity.

The shared session lab must come out unchanged: every VM these tests create is
destroyed and undefined wherever it ended up, and the lab's own guests on the
evacuated host are dropped from the plan (the plan-editing feature) so they never move.

Capacity: every lab host reports the machine's memory, so one host is made "small"
by a ballast guest whose (lazily allocated, never touched) RAM is promised to it —
the planner counts memory promised to active domains, as it must for real hosts.
vCPUs: the lab's hosts have the machine's 2 CPUs each, so the tests allow an
overcommit ratio (``vcpu_ratio``), as an admin of such small hosts would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import subprocess
import sys
import time
import tomllib
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tomli_w

from console.adapters.audit import read_entries, verify_file
from console.core.grants import AdminRef, build_grant_payload, sign_grant
from console.services.emergency import declared
from console.services.evacuation import (
    EvacuationService,
    InventoryLocator,
    Limits,
    MigrationMover,
    Summary,
    VMUpdate,
)
from console.services.fleet import FleetService
from console.services.inventory import InventoryService
from console.services.migration import MigrationService

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

SOURCE = "fra-2"  # holds the lab's web-2, which the plan drops
SAME_REGION = "fra-1"  # made too small by a ballast guest
OTHER = "par-1"
ADMIN = "lab-admin"
BIG_MIB = 2560


def _libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    return libvirt


@pytest.fixture(scope="module")
def evac_fleet(lab: Lab) -> Path:
    """The lab's fleet file plus a grants directory for the VMs these tests create."""
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    (lab.dir / "evac-grants").mkdir(exist_ok=True)
    doc["grants"] = [*doc.get("grants", []), "evac-grants"]
    path = lab.dir / "fleet-evacuation.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    # these tests' grants are emergency-only: they count only for hosts under a declared emergency
    for host in (SOURCE, "rogue-1"):
        _declare(path, host)
    return path


def _declare(fleet: Path, host: str) -> None:
    out = subprocess.run([sys.executable, "-m", "console", "emergency", "declare", host, "--fleet",
                          str(fleet), "--reason", "lab evacuation tests", "--hours", "2"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr


def _pki(lab: Lab) -> Any:
    from console.lab import certs

    return lab.pki or certs.load(lab.pki_dir)


def _grant(lab: Lab, fleet: Path, owner: str, uuids: list[str]) -> None:
    """``owner`` grants lab-admin these VMs for an hour, for emergencies (evacuations) only."""
    doc = tomllib.loads(fleet.read_text(encoding="utf-8"))
    fp = next(a["ssh_key_fingerprint"] for a in doc["admins"] if a["id"] == ADMIN)
    signer = _pki(lab).owners[owner]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner=owner, admin=AdminRef(ADMIN, ssh_key=fp), vms=uuids,
                                  not_before=now - dt.timedelta(minutes=5),
                                  not_after=now + dt.timedelta(hours=1), emergency_only=True)
    (lab.dir / "evac-grants" / f"{owner}-{uuidlib.uuid4().hex[:8]}.jws").write_text(
        sign_grant(payload, signer.key, [signer.cert]))


def _pinned_guest(lab: Lab, host: str, name: str) -> str:
    """bob's VM whose policy allows only Swiss hosts under eu-central: no live host qualifies."""
    from console.lab import guests
    from console.lab.hosts import GuestPlan, hypervisor

    vm_uuid = str(uuidlib.uuid4())
    plan = GuestPlan(name, "bob", trust=("eu-central",), require=(("country", ("CH",)),))
    meta = guests.policy_metadata(_pki(lab), hypervisor(host), plan, vm_uuid)
    with lab.guard_off(host):  # the host guard would refuse to start it (the policy admits no host)
        conn = lab.open_libvirt(host)
        try:
            guests.define_guest(conn, name, memory_mib=64, uuid=vm_uuid, metadata_xml=meta)
        finally:
            conn.close()
    return vm_uuid


def _uuid_of(lab: Lab, host: str, name: str) -> str:
    conn = lab.open_libvirt(host)
    try:
        return str(conn.lookupByName(name).UUIDString())
    finally:
        conn.close()


def _where(lab: Lab, uuid: str) -> dict[str, str]:
    """host -> state, asked of every hypervisor's libvirt directly (not through escort)."""
    libvirt = _libvirt()
    out: dict[str, str] = {}
    for host in lab.hypervisors:
        conn = lab.open_libvirt(host)
        try:
            state, _reason = conn.lookupByUUIDString(uuid).state()
            out[host] = "running" if state == libvirt.VIR_DOMAIN_RUNNING else f"state {state}"
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return out


def _remove(lab: Lab, uuids: list[str]) -> None:
    """Destroy and undefine the guests wherever they are, in parallel (libvirt gives each
    QEMU a few seconds to exit after SIGTERM, which adds up one guest after another)."""
    libvirt = _libvirt()

    def one(host: str) -> None:
        conn = lab.open_libvirt(host)
        try:
            doms = []
            for uuid in uuids:
                with contextlib.suppress(libvirt.libvirtError):
                    doms.append(conn.lookupByUUIDString(uuid))

            def gone(dom: Any) -> None:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()

            with ThreadPoolExecutor(max(1, len(doms))) as pool:
                list(pool.map(gone, doms))
        finally:
            conn.close()

    with ThreadPoolExecutor(len(lab.hypervisors)) as pool:
        list(pool.map(one, lab.hypervisors))


@pytest.fixture()
def created(lab: Lab) -> Iterator[list[str]]:
    """UUIDs of guests a test defines; removed from every host afterwards."""
    uuids: list[str] = []
    yield uuids
    _remove(lab, uuids)


async def _evacuate(fleet_path: Path, sources: list[str], *, drop: list[str], limits: Limits,
                    bandwidth: int = 0, abort_when_copying: bool = False,
                    ) -> tuple[Any, Summary, list[VMUpdate], Path]:
    fleet = FleetService.load_strict(fleet_path, eager=True)
    inventory = InventoryService.for_fleet(fleet)
    migrations = MigrationService(fleet, inventory, bandwidth_mib_s=bandwidth)
    try:
        await inventory.refresh()
        ev = EvacuationService(fleet, admin=ADMIN, vcpu_ratio=8.0, mover=MigrationMover(migrations),
                               locator=InventoryLocator(inventory, fleet), audit=migrations.audit,
                               emergencies=declared(fleet, migrations.audit.path))
        planned = ev.plan(sources)
        for name in drop:
            if any(m.vm.name == name for m in planned.moves):
                planned.drop(name)
        events: list[VMUpdate] = []
        run = ev.start(planned, limits=limits,
                       on_event=lambda e: events.append(e) if isinstance(e, VMUpdate) else None)
        task = asyncio.create_task(run.run())
        if abort_when_copying:
            deadline = time.monotonic() + 90
            while not any(r.phase in ("copying", "converging") for r in run.board.values()):
                assert time.monotonic() < deadline, "no move reached copying"
                assert not task.done()
                await asyncio.sleep(0.1)
            run.abort_all()
        summary = await task
        return planned, summary, events, migrations.audit.path
    finally:
        await migrations.close()
        await inventory.close()


def test_evacuate_moves_the_others_over_tls_and_names_the_owner_of_the_one_that_cannot_move(
        lab: Lab, evac_fleet: Path, created: list[str]) -> None:
    libvirt = _libvirt()
    conn = lab.open_libvirt(SAME_REGION)
    try:
        host_mib = int(conn.getInfo()[1])
        active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        promised = sum(d.info()[1] // 1024 for d in active)
    finally:
        conn.close()
    # fra-1 keeps BIG_MIB - 512 MiB of room: enough for small guests, not for ev-big
    ballast = host_mib - promised - (BIG_MIB - 512)
    created.append(lab.define_guest(SAME_REGION, "ev-ballast", memory_mib=ballast))
    small = [lab.define_guest(SOURCE, f"ev-small-{i}", owner="alice") for i in (1, 2)]
    big = lab.define_guest(SOURCE, "ev-big", memory_mib=BIG_MIB, owner="alice")
    pinned = _pinned_guest(lab, SOURCE, "ev-pinned")
    created.extend([*small, big, pinned])
    web2 = _uuid_of(lab, SOURCE, "web-2")  # the lab's own guest: planned, then dropped
    _grant(lab, evac_fleet, "alice", [*small, big, web2])
    _grant(lab, evac_fleet, "bob", [pinned])

    # the CLI, as an admin runs it first: a dry run shows the plan and the owner to call
    dry = subprocess.run([sys.executable, "-m", "console", "evacuate", "--fleet", str(evac_fleet), SOURCE,
                          "--admin", ADMIN, "--dry-run", "--json", "--cpu-ratio", "8"],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 1, dry.stderr  # one VM cannot move
    plan_doc = json.loads(dry.stdout.splitlines()[0])
    assert plan_doc["event"] == "plan"
    (stuck_doc,) = plan_doc["stuck"]
    assert stuck_doc["vm"] == "ev-pinned" and stuck_doc["owner_to_contact"].startswith("bob")
    planned_doc = {m["vm"]: m["target"] for m in plan_doc["moves"]}
    assert set(planned_doc) == {"ev-small-1", "ev-small-2", "ev-big", "web-2"}
    assert planned_doc["ev-big"] == OTHER

    planned, summary, events, audit_path = asyncio.run(_evacuate(
        evac_fleet, [SOURCE], drop=["web-2"], limits=Limits(parallel=3, per_source=3, per_target=2)))

    targets = {m.vm.name: m.target for m in planned.moves}
    assert targets == {"ev-small-1": SAME_REGION, "ev-small-2": SAME_REGION, "ev-big": OTHER}
    caps = planned.capacities
    assert caps[SAME_REGION].free_memory_mib < BIG_MIB <= caps[OTHER].free_memory_mib  # too small: skipped
    (stuck,) = planned.stuck
    assert stuck.vm.name == "ev-pinned" and stuck.owner_to_contact.startswith("bob")
    codes = {h: {r.code for r in rs} for h, rs in stuck.why_not}
    assert "attr.country" in codes[SAME_REGION] and "ca.not_trusted" in codes[OTHER]

    assert sorted(u.name for u in summary.moved) == ["ev-big", "ev-small-1", "ev-small-2"], summary.text()
    assert summary.failed == []
    for name, uuid in (("ev-small-1", small[0]), ("ev-small-2", small[1]), ("ev-big", big)):
        assert _where(lab, uuid) == {targets[name]: "running"}  # on its target only
    assert _where(lab, pinned) == {SOURCE: "running"}
    assert _where(lab, web2) == {SOURCE: "running"}  # dropped from the plan: never moved
    assert [v.name for v in summary.dropped] == ["web-2"]
    phases = {e.phase for e in events}
    assert {"queued", "preflight", "moved"} <= phases

    entries = read_entries(audit_path)
    assert verify_file(audit_path).ok
    decisions = [e for e in entries if e.get("kind") == "decision" and e.get("uuid") in (*small, big)]
    assert decisions and all("TLS" in e["flags"] for e in decisions)  # the migrations asked for TLS
    evac = [e for e in entries if e.get("kind") == "evacuation"]
    assert [e["event"] for e in evac[-2:]] == ["start", "summary"]
    last = evac[-1]
    assert {m["vm"] for m in last["moved"]} == {"ev-small-1", "ev-small-2", "ev-big"}
    assert last["not_movable"][0]["owner_to_contact"].startswith("bob")
    print(summary.text())


def test_abort_during_the_run_leaves_every_vm_on_exactly_one_host(
        lab: Lab, evac_fleet: Path, created: list[str]) -> None:
    uuids = [lab.define_guest(SOURCE, f"ev-slow-{i}", memory_mib=128, random_fill_mib=48, owner="alice")
             for i in range(3)]
    created.extend(uuids)
    _grant(lab, evac_fleet, "alice", uuids)
    _planned, summary, events, audit_path = asyncio.run(_evacuate(
        evac_fleet, [SOURCE], drop=["web-2"], limits=Limits(parallel=2, per_source=2, per_target=1),
        bandwidth=8, abort_when_copying=True))
    assert len(summary.failed) >= 2, summary.text()  # at least the running ones and the queued one
    for u in summary.failed:
        assert u.phase == "aborted" and u.vm_on == SOURCE
    for uuid in uuids:
        where = _where(lab, uuid)
        assert list(where.values()) == ["running"], where  # exactly one host runs it
    assert verify_file(audit_path).ok
    assert "aborted" in summary.text()
    print(summary.text())
    assert [e.phase for e in events if e.name == "ev-slow-0"][:2] == ["queued", "preflight"]


@pytest.fixture(scope="module")
def cli_fleet(lab: Lab) -> Path:
    """A fleet file of its own whose grants name only the VMs the CLI tests create."""
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    (lab.dir / "evac-cli-grants").mkdir(exist_ok=True)
    doc["grants"] = [*doc.get("grants", []), "evac-cli-grants"]
    path = lab.dir / "fleet-evacuation-cli.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    _declare(path, SOURCE)
    return path


def _cli_grant(lab: Lab, fleet: Path, uuids: list[str]) -> None:
    doc = tomllib.loads(fleet.read_text(encoding="utf-8"))
    fp = next(a["ssh_key_fingerprint"] for a in doc["admins"] if a["id"] == ADMIN)
    signer = _pki(lab).owners["alice"]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner="alice", admin=AdminRef(ADMIN, ssh_key=fp), vms=uuids,
                                  not_before=now - dt.timedelta(minutes=5),
                                  not_after=now + dt.timedelta(hours=1), emergency_only=True)
    (lab.dir / "evac-cli-grants" / f"{uuidlib.uuid4().hex[:8]}.jws").write_text(
        sign_grant(payload, signer.key, [signer.cert]))


def test_cli_evacuates_with_yes_and_reports_json(lab: Lab, cli_fleet: Path, created: list[str]) -> None:
    """As an admin runs it: the lab's own web-2 has no grant here, so it stays (stuck, owner
    named) and the exit code is 1; the guest with a grant moves over TLS and is found there."""
    uuid = lab.define_guest(SOURCE, "ev-cli", owner="alice")
    created.append(uuid)
    _cli_grant(lab, cli_fleet, [uuid])
    out = subprocess.run([sys.executable, "-m", "console", "evacuate", "--fleet", str(cli_fleet), SOURCE,
                          "--yes", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["event"] == "plan" and lines[-1]["event"] == "summary"
    summary = lines[-1]
    assert [m["vm"] for m in summary["moved"]] == ["ev-cli"]
    (web2,) = [s for s in summary["not_movable"] if s["vm"] == "web-2"]
    assert web2["owner_to_contact"].startswith("alice")
    assert any(r["code"].startswith("grant.") for r in web2["reasons"])
    target = summary["moved"][0]["to"]
    assert _where(lab, uuid) == {target: "running"}
    assert _where(lab, _uuid_of(lab, SOURCE, "web-2")) == {SOURCE: "running"}
    assert {e["phase"] for e in lines if e["event"] == "vm"} >= {"queued", "preflight", "moved"}


def test_a_failed_move_is_reported_still_running_on_its_source_and_the_others_go_on(
        lab: Lab, evac_fleet: Path, created: list[str]) -> None:
    """rogue-1's certificate (QEMU's TLS *client* certificate on the source side) comes from a
    CA outside the tree, so every target's QEMU refuses the migration stream; a second guest
    on a healthy source in the same run still moves."""
    with lab.guard_off("rogue-1"):  # rogue-1's own guard refuses policies it cannot meet
        bad = lab.define_guest("rogue-1", "ev-rogue", owner="alice")
    good = lab.define_guest(SOURCE, "ev-fine", owner="alice")
    created.extend([bad, good])
    _grant(lab, evac_fleet, "alice", [bad, good])
    planned, summary, _events, audit_path = asyncio.run(_evacuate(
        evac_fleet, ["rogue-1", SOURCE], drop=["web-2"], limits=Limits()))
    print(summary.text())
    assert "evacuate.source_cert" in [n.code for n in planned.notes]  # the plan warned
    (failed,) = summary.failed
    assert failed.name == "ev-rogue" and failed.phase == "failed"
    assert failed.vm_on == "rogue-1" and "still running on rogue-1" in summary.text()
    assert [u.name for u in summary.moved] == ["ev-fine"]
    assert _where(lab, bad) == {"rogue-1": "running"}
    assert list(_where(lab, good).values()) == ["running"] and SOURCE not in _where(lab, good)
    assert verify_file(audit_path).ok


def test_an_emergency_only_grant_counts_only_after_a_declaration(lab: Lab, tmp_path: Path,
                                                                 created: list[str]) -> None:
    """A healthy host evacuated without a declaration uses ordinary grants only; after
    `escort emergency declare` (signed with the admin's key, audited) the same grant counts."""
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    grants = tmp_path / "grants"
    grants.mkdir()
    doc["grants"] = [str(grants)]  # only this test's emergency-only grant
    doc["audit_log"] = str(tmp_path / "audit.log")  # no declaration from other tests
    fleet = lab.dir / f"fleet-emergency-{uuidlib.uuid4().hex[:6]}.toml"
    fleet.write_text(tomli_w.dumps(doc), encoding="utf-8")
    uuid = lab.define_guest(OTHER, "ev-emerg", owner="alice")
    created.append(uuid)
    fp = next(a["ssh_key_fingerprint"] for a in doc["admins"] if a["id"] == ADMIN)
    signer = _pki(lab).owners["alice"]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner="alice", admin=AdminRef(ADMIN, ssh_key=fp), vms=[uuid],
                                  not_before=now, not_after=now + dt.timedelta(hours=1), emergency_only=True)
    (grants / "emergency.jws").write_text(sign_grant(payload, signer.key, [signer.cert]))

    def plan() -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "console", "evacuate", "--fleet", str(fleet), OTHER,
                              "--admin", ADMIN, "--dry-run", "--json"], capture_output=True, text=True,
                             timeout=120)
        doc = json.loads(out.stdout.splitlines()[0])
        assert doc["event"] == "plan", out.stderr
        return doc

    before = plan()
    assert "ev-emerg" not in [m["vm"] for m in before["moves"]]
    (stuck,) = [s for s in before["stuck"] if s["vm"] == "ev-emerg"]
    assert "grant.emergency_only" in json.dumps(stuck)
    _declare(fleet, OTHER)
    listed = subprocess.run([sys.executable, "-m", "console", "emergency", "list", "--fleet", str(fleet),
                             "--json"], capture_output=True, text=True, timeout=60)
    assert [e["host"] for e in json.loads(listed.stdout)] == [OTHER]
    after = plan()
    assert "ev-emerg" in [m["vm"] for m in after["moves"]]
    entries = read_entries(tmp_path / "audit.log")
    (decl,) = [e for e in entries if e["kind"] == "emergency"]
    assert decl["host"] == OTHER and decl["admin"] == ADMIN and decl["declaration_sig"]
    assert verify_file(tmp_path / "audit.log").ok
