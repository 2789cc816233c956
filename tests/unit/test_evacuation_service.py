"""EvacuationService on generated fleets: real certificates, signed policies and grants,
the real decision code, fake host facts (``apply_facts``) and a fake mover/locator."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from console.adapters.audit import AuditLog, read_entries, verify_file
from console.core import grants as gr
from console.core import issuance as iss
from console.core import policy as pol
from console.core.errors import EscortError, InputError, ReadOnlyError
from console.core.evacuation import Move, capacity_from_facts
from console.core.inventory import DomainFacts, HostFacts
from console.core.migration import Outcome, Progress
from console.services.evacuation import (
    EvacuationRun,
    EvacuationService,
    Limits,
    PlannedEvacuation,
    RunFinished,
    Summary,
    VMUpdate,
)
from console.services.fleet import FleetService
from tests.unit.trustkit import ANNE_KEY, T0, Kit, empty_crl, fp, host_cert, make_kit

GiB = 1024


@dataclass
class GenVM:
    name: str
    host: str
    owner: str  # "alice" | "bob"
    trust: tuple[str, ...]  # "eu" | "us" | "root"
    require: dict[str, list[str]] = field(default_factory=dict)
    memory_mib: int = 1024
    vcpus: int = 1
    state: str = "running"
    labels: tuple[str, ...] = ()
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))


@dataclass
class GenHost:
    name: str
    region: str  # "eu" | "us"
    country: str = "DE"
    memory_mib: int = 64 * GiB
    free_mib: int = 60 * GiB
    cpus: int = 16
    days: float = 365
    up: bool = True


@dataclass
class Gen:
    fleet: Path
    kit: Kit
    hosts: dict[str, GenHost]
    vms: dict[str, GenVM]

    def service(self, *, readonly: bool = False) -> FleetService:
        s = FleetService.load_strict(self.fleet, at=T0, readonly=readonly, eager=True)
        issuers = {"eu": self.kit.eu, "us": self.kit.us}
        owners = {"alice": self.kit.alice, "bob": self.kit.bob}
        cas = {"eu": ("Region EU", fp(self.kit.eu.cert)), "us": ("Region US", fp(self.kit.us.cert)),
               "root": ("Test Root", fp(self.kit.root.cert))}
        del issuers
        for h in self.hosts.values():
            if not h.up:
                s.apply_facts(h.name, None, None)
                continue
            doms = []
            for v in self.vms.values():
                if v.host != h.name:
                    continue
                o = owners[v.owner]
                payload = pol.build_policy_payload(
                    owner=o.email, vm_uuid=v.uuid, vm_name=v.name, trusted_cas=[cas[t] for t in v.trust],
                    require=v.require, not_before=T0 - dt.timedelta(days=1),
                    not_after=T0 + dt.timedelta(days=90), labels=v.labels)
                doms.append(DomainFacts(v.uuid, v.name, v.state, memory_mib=v.memory_mib, vcpus=v.vcpus,
                                        policy_token=pol.sign_policy(payload, o.key, o.chain)))
            s.apply_facts(h.name, HostFacts(h.name, h.memory_mib, h.cpus, h.free_mib, tuple(doms)), None)
        return s


def generate(root: Path, hosts: Sequence[GenHost], vms: Sequence[GenVM], *, kit: Kit | None = None,
             grant_label: str = "web", emergency_only: bool = True, audit: bool = True) -> Gen:
    """Write a fleet (trust dirs, host certificates, an admin with a grant) into ``root``."""
    kit = kit or make_kit()

    def write(rel: str, data: bytes | str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())

    for name, ca in (("root", kit.root), ("eu", kit.eu), ("us", kit.us)):
        write(f"trust/hosts/{name}.pem", iss.cert_pem(ca.cert))
        write(f"trust/hosts/{name}.crl", empty_crl(ca))
    write("trust/owners/owners-ca.pem", iss.cert_pem(kit.owners_ca.cert))
    write("trust/owners/owners-ca.crl", empty_crl(kit.owners_ca))
    toml = ['name = "generated"', 'kind = "lab"', 'trust_dir = "trust/hosts"',
            'owners_trust_dir = "trust/owners"', 'grants = ["grants"]']
    if audit:
        toml.append('audit_log = "audit.log"')
    for h in hosts:
        issuer = kit.eu if h.region == "eu" else kit.us
        start = T0 - dt.timedelta(days=h.days / 2) if h.days < 1 else None
        cert, _ = host_cert(issuer, h.name, country=h.country, days=h.days, start=start)
        write(f"certs/{h.name}.pem", iss.cert_pem(cert))
        toml += ["", "[[hosts]]", f'name = "{h.name}"', f'region = "{h.region}"',
                 f'cert_file = "certs/{h.name}.pem"']
    toml += ["", "[[admins]]", 'id = "anne"', f'ssh_key_fingerprint = "{ANNE_KEY}"']
    grant = gr.build_grant_payload(owner=kit.alice.email, admin=gr.AdminRef("anne", ANNE_KEY),
                                   label=grant_label, not_before=T0 - dt.timedelta(hours=1),
                                   not_after=T0 + dt.timedelta(hours=8), emergency_only=emergency_only)
    write("grants/anne-alice.jws", gr.sign_grant(grant, kit.alice.key, kit.alice.chain))
    write("fleet.toml", "\n".join(toml) + "\n")
    return Gen(root / "fleet.toml", kit, {h.name: h for h in hosts}, {v.name: v for v in vms})


@pytest.fixture(scope="module")
def kit() -> Kit:
    return make_kit()


def small(root: Path, kit: Kit) -> Gen:
    hosts = [GenHost("src", "eu"), GenHost("eu-a", "eu", free_mib=8 * GiB),
             GenHost("eu-b", "eu", free_mib=16 * GiB), GenHost("us-a", "us", country="US"),
             GenHost("us-down", "us", country="US", up=False)]
    vms = [GenVM("web-1", "src", "alice", ("eu", "us"), labels=("web",)),
           GenVM("web-2", "src", "alice", ("eu",), labels=("web",)),
           GenVM("pinned", "src", "bob", ("us",), require={"country": ["CA"]}),
           GenVM("off", "src", "alice", ("eu",), state="shut off"),
           GenVM("elsewhere", "eu-a", "alice", ("eu",))]
    return generate(root, hosts, vms, kit=kit)


def test_plan_moves_spreads_and_names_the_owner_of_a_stuck_vm(tmp_path: Path, kit: Kit) -> None:
    g = small(tmp_path, kit)
    ev = EvacuationService(g.service())
    planned = ev.plan(["src"])
    targets = {m.vm.name: m.target for m in planned.moves}
    # same region first, the host with the most free memory first: both go to eu-b (16 GiB) / spread
    assert set(targets) == {"web-1", "web-2"}
    assert all(t in ("eu-a", "eu-b") for t in targets.values())
    (stuck,) = planned.stuck
    assert stuck.vm.name == "pinned" and stuck.owner_to_contact == "Bob <bob@example.org>"
    why = {h: [r.code for r in rs] for h, rs in stuck.why_not}
    assert set(why) == {"eu-a", "eu-b", "us-a", "us-down"}
    assert "ca.not_trusted" in why["eu-a"]
    assert "attr.country" in why["us-a"]
    assert "host.down" in why["us-down"]
    (held, reason) = planned.held[0]
    assert held.name == "off" and reason.code == "evacuate.not_running"
    text = "\n".join(planned.lines())
    assert "call the owner" in text and "Bob <bob@example.org>" in text and "[attr.country]" in text
    doc = planned.as_json()
    assert doc["stuck"][0]["owner_to_contact"] == "Bob <bob@example.org>"
    assert {m["vm"] for m in doc["moves"]} == {"web-1", "web-2"}


def test_capacity_from_facts_counts_promised_memory_and_vcpus() -> None:
    doms = (DomainFacts("u1", "a", "running", memory_mib=6000, vcpus=3),
            DomainFacts("u2", "b", "shut off", memory_mib=50000, vcpus=8),
            DomainFacts("u3", "c", "paused", memory_mib=1000, vcpus=1))
    facts = HostFacts("h", memory_mib=8192, cpus=4, free_memory_mib=7000, domains=doms)
    cap = capacity_from_facts("h", "eu", facts)
    assert (cap.free_memory_mib, cap.free_vcpus) == (8192 - 7000, 0)
    assert capacity_from_facts("h", "eu", facts, vcpu_ratio=4.0).free_vcpus == 16 - 4


def test_a_target_too_small_is_skipped_and_room_is_consumed(tmp_path: Path, kit: Kit) -> None:
    hosts = [GenHost("src", "eu"), GenHost("small", "eu", memory_mib=64 * GiB, free_mib=3 * GiB),
             GenHost("big", "us", country="US", free_mib=20 * GiB, cpus=3)]
    vms = [GenVM(f"v{i}", "src", "alice", ("root",), memory_mib=4 * GiB) for i in range(5)]
    g = generate(tmp_path, hosts, vms, kit=kit)
    planned = EvacuationService(g.service()).plan(["src"])
    # "small" is preferred (same region) but has 3 GiB; "big" has 3 vCPUs: three fit there
    assert sorted(m.target for m in planned.moves) == ["big"] * 3
    assert len(planned.stuck) == 2
    codes = {h: rs[0].code for h, rs in planned.stuck[0].why_not}
    assert codes == {"small": "capacity.full", "big": "capacity.full"}
    # retarget onto a host without room is refused with the reason; drop works
    move = planned.moves[0]
    why = planned.retarget(move.vm.name, "small")
    assert why is not None and why.code == "capacity.full"
    planned.drop(move.vm.name)
    assert [v.name for v in planned.plan.dropped] == [move.vm.name]
    with pytest.raises(InputError):
        planned.drop("no-such-vm")


def test_grant_checked_for_the_admin_in_an_emergency(tmp_path: Path, kit: Kit) -> None:
    g = small(tmp_path, kit)
    # no emergency declared for src: anne's emergency-only grant does not count
    healthy = EvacuationService(g.service(), admin="anne").plan(["src"])
    assert healthy.moves == []
    assert all("grant.emergency_only" in {r.code for _, rs in s.why_not for r in rs}
               for s in healthy.stuck if s.vm.name.startswith("web"))
    planned = EvacuationService(g.service(), admin="anne", emergencies={"src"}).plan(["src"])
    # declared: anne's emergency-only grant covers alice's VMs labelled web; bob's VM has no grant
    assert {m.vm.name for m in planned.moves} == {"web-1", "web-2"}
    (stuck,) = planned.stuck
    codes = {r.code for _, rs in stuck.why_not for r in rs}
    assert stuck.vm.name == "pinned" and "grant.wrong_vm" in codes  # the grant names alice's web VMs
    unknown = EvacuationService(g.service(), admin="nobody").plan(["src"])
    assert unknown.moves == []
    assert all(any(r.code.startswith("grant.") for r in rs)
               for s in unknown.stuck for _, rs in s.why_not)


def test_grant_for_another_label_leaves_the_vm_stuck_with_the_grant_reason(tmp_path: Path, kit: Kit) -> None:
    hosts = [GenHost("src", "eu"), GenHost("eu-a", "eu")]
    vms = [GenVM("db", "src", "alice", ("eu",), labels=("db",))]
    g = generate(tmp_path, hosts, vms, kit=kit)
    planned = EvacuationService(g.service(), admin="anne", emergencies={"src"}).plan(["src"])
    (stuck,) = planned.stuck
    assert [r.code for r in dict(stuck.why_not)["eu-a"]] == ["grant.wrong_vm"]


def test_target_certificate_must_outlive_the_migration(tmp_path: Path, kit: Kit) -> None:
    hosts = [GenHost("src", "eu"), GenHost("brief", "eu", days=0.004)]  # ~3 min left at T0
    vms = [GenVM("v", "src", "alice", ("eu",))]
    g = generate(tmp_path, hosts, vms, kit=kit)
    svc = g.service()
    assert svc.explain(g.vms["v"].uuid, "brief").allowed  # valid now...
    planned = EvacuationService(svc).plan(["src"])
    (stuck,) = planned.stuck  # ...but not for long enough
    assert [r.code for r in dict(stuck.why_not)["brief"]] == ["evacuate.cert_expiring"]


def test_drain_a_ca_excludes_every_host_under_it(tmp_path: Path, kit: Kit) -> None:
    g = small(tmp_path, kit)
    ev = EvacuationService(g.service())
    planned = ev.plan_drain("Region EU")
    assert set(planned.sources) == {"src", "eu-a", "eu-b"}
    assert "drain.ca_valid" in [n.code for n in planned.notes]
    # web-1 trusts eu and us: it can go to us-a; the EU-only VMs are stuck
    assert {m.vm.name: m.target for m in planned.moves} == {"web-1": "us-a"}
    assert {s.vm.name for s in planned.stuck} == {"web-2", "elsewhere", "pinned"}
    by_fp = ev.plan_drain(fp(kit.eu.cert))
    assert by_fp.sources == planned.sources
    with pytest.raises(InputError):
        ev.ca_node("No Such CA")
    with pytest.raises(InputError):
        ev.plan(["no-such-host"])


# ---------------------------------------------------------------------------- running
class FakeMover:
    """Moves by editing the fake world; fails or hangs (until aborted) on request."""

    def __init__(self, world: dict[str, str], *, fail: Sequence[str] = (), hang: Sequence[str] = (),
                 delay: float = 0.02) -> None:
        self.world = world  # uuid -> host where it runs
        self.fail, self.hang, self.delay = set(fail), set(hang), delay
        self.started: list[str] = []

    async def move(self, move: Move, *, admin: str | None, on_progress: object,
                   abort: asyncio.Event) -> Outcome:
        self.started.append(move.vm.name)
        assert callable(on_progress)
        on_progress(Progress("copying", data_total=100, data_processed=50, data_remaining=50))
        if move.vm.name in self.hang:
            await abort.wait()
            return Outcome("aborted", move.vm.source, "operation aborted: job 'migration out' canceled")
        try:
            await asyncio.wait_for(abort.wait(), self.delay)
            return Outcome("aborted", move.vm.source, "aborted")
        except TimeoutError:
            pass
        if move.vm.name in self.fail:
            return Outcome("failed", move.vm.source, "The certificate hasn't got a known issuer")
        self.world[move.vm.uuid] = move.target
        return Outcome("success", move.target)


class FakeLocator:
    def __init__(self, world: dict[str, str]) -> None:
        self.world = world

    async def states(self, uuid: str, hosts: Sequence[str]) -> dict[str, str]:
        return {h: ("running" if self.world.get(uuid) == h else "") for h in hosts}


def many(tmp_path: Path, kit: Kit, n: int = 12) -> Gen:
    hosts = [GenHost("src", "eu", cpus=64), GenHost("src2", "eu", cpus=64)] + [
        GenHost(f"t{i}", "eu") for i in range(4)]
    vms = [GenVM(f"vm{i:02d}", "src" if i % 3 else "src2", "alice", ("eu",), memory_mib=512)
           for i in range(n)]
    return generate(tmp_path, hosts, vms, kit=kit)


def test_run_respects_bounds_reports_failures_and_writes_the_audit_log(tmp_path: Path, kit: Kit) -> None:
    g = many(tmp_path, kit)
    world = {v.uuid: v.host for v in g.vms.values()}
    mover = FakeMover(world, fail=["vm04"])
    audit = AuditLog(tmp_path / "audit.log")
    ev = EvacuationService(g.service(), mover=mover, locator=FakeLocator(world), audit=audit)
    planned = ev.plan(["src", "src2"])
    assert len(planned.moves) == 12
    events: list[object] = []

    async def go() -> tuple[EvacuationRun, Summary]:
        r = ev.start(planned, limits=Limits(parallel=3, per_source=2, per_target=1), on_event=events.append)
        q = r.queue()
        s = await r.run()
        queued = [q.get_nowait() for _ in range(q.qsize())]
        assert queued == events  # the queue sees exactly what the callback sees
        return r, s

    r, summary = asyncio.run(go())
    assert r.max_in_flight <= 3 and max(r.max_per_source.values()) <= 2
    assert max(r.max_per_target.values()) == 1
    assert len(summary.moved) == 11
    (failed,) = summary.failed
    assert failed.name == "vm04" and failed.vm_on == failed.source  # checked on the source
    assert "known issuer" in failed.message
    assert "still running on src" in summary.text()
    phases = {e.phase for e in events if isinstance(e, VMUpdate)}
    assert {"queued", "preflight", "copying", "verifying", "moved", "failed"} <= phases
    assert isinstance(events[-1], RunFinished)
    audit.close()
    assert verify_file(tmp_path / "audit.log", signatures=False).ok  # fake mover: nobody signs
    entries = read_entries(tmp_path / "audit.log")
    assert [e["event"] for e in entries] == ["start", "summary"]
    assert entries[1]["failed"][0]["vm"] == "vm04" and len(entries[1]["moved"]) == 11


def test_abort_one_and_abort_all_leave_every_vm_on_one_host(tmp_path: Path, kit: Kit) -> None:
    g = many(tmp_path, kit, n=9)
    world = {v.uuid: v.host for v in g.vms.values()}
    mover = FakeMover(world, hang=["vm01"], delay=0.05)
    ev = EvacuationService(g.service(), mover=mover, locator=FakeLocator(world))
    planned = ev.plan(["src", "src2"])

    async def go() -> Summary:
        r = ev.start(planned, limits=Limits(parallel=2, per_source=2, per_target=2))
        task = asyncio.create_task(r.run())
        while "vm01" not in mover.started:
            await asyncio.sleep(0.01)
        assert r.abort("vm01")
        await asyncio.sleep(0.12)
        r.abort_all()
        return await task

    summary = asyncio.run(go())
    rows = {u.name: u for u in [*summary.moved, *summary.failed]}
    assert rows["vm01"].phase == "aborted" and rows["vm01"].vm_on == rows["vm01"].source
    assert len(rows) == 9
    for u in rows.values():
        assert u.vm_on in (u.source, u.target) and world[u.uuid] == u.vm_on
    assert any(u.phase == "aborted" and "before it started" in u.message for u in rows.values())
    assert len(mover.started) < 9


def test_readonly_and_demo_refuse_to_run(tmp_path: Path, kit: Kit) -> None:
    g = small(tmp_path, kit)
    world: dict[str, str] = {}
    ro = EvacuationService(g.service(readonly=True), mover=FakeMover(world), locator=FakeLocator(world))
    with pytest.raises(ReadOnlyError):
        ro.start(ro.plan(["src"]))
    demo = g.fleet.read_text().replace('kind = "lab"', 'kind = "demo"')
    g.fleet.write_text(demo)
    d = EvacuationService(g.service(), mover=FakeMover(world), locator=FakeLocator(world))
    planned = d.plan(["src"])  # planning works on the demo
    with pytest.raises(EscortError, match="needs real hosts"):
        d.start(planned)
    with pytest.raises(InputError):
        Limits(per_target=65)


def test_large_generated_fleet_agrees_with_the_decision_code(tmp_path: Path, kit: Kit) -> None:
    rng = random.Random(11)
    hosts = [GenHost(f"h{i:03d}", rng.choice(["eu", "us"]), free_mib=rng.randint(1, 24) * GiB,
                     cpus=rng.randint(2, 16)) for i in range(60)]
    for h in hosts:
        h.country = "DE" if h.region == "eu" else "US"
    sources = [h.name for h in hosts[:3]]
    vms = [GenVM(f"g{i:03d}", rng.choice(sources), rng.choice(["alice", "bob"]),
                 tuple(rng.sample(["eu", "us", "root"], rng.randint(1, 2))),
                 require=rng.choice([{}, {"country": ["DE"]}, {"country": ["FR"]}]),
                 memory_mib=rng.choice([512, 2048, 8192]), vcpus=rng.randint(1, 4))
           for i in range(150)]
    g = generate(tmp_path, hosts, vms, kit=kit)
    svc = g.service()
    planned = EvacuationService(svc).plan(sources)
    assert len(planned.moves) + len(planned.stuck) == 150
    assert planned.moves and planned.stuck
    caps = planned.capacities
    for target, (mem, cpu) in planned.plan.load().items():
        assert mem <= caps[target].free_memory_mib and cpu <= caps[target].free_vcpus
    for m in planned.moves[:40]:
        assert m.target not in sources
        assert svc.explain(m.vm.uuid, m.target, emergency=True).allowed
    for s in planned.stuck[:10]:
        for host, reasons in s.why_not:
            assert reasons, host
            decided = svc.explain(s.vm.uuid, host, emergency=True)
            assert decided.allowed == (reasons[0].code in ("capacity.full", "evacuate.cert_expiring"))


def test_deferred_explanations_match_the_eager_ones(tmp_path: Path, kit: Kit) -> None:
    g = small(tmp_path, kit)
    svc = g.service()
    eager = EvacuationService(svc, admin="anne").plan(["src"])
    ev = EvacuationService(svc, admin="anne")
    lazy = ev.plan(["src"], explain=False)
    assert not lazy.explained and all(not rs for s in lazy.stuck for _, rs in s.why_not)
    ev.explain_stuck(lazy)
    assert lazy.explained

    def codes(p: PlannedEvacuation) -> dict[str, dict[str, list[str]]]:
        return {s.vm.name: {h: [r.code for r in rs] for h, rs in s.why_not} for s in p.stuck}

    assert codes(lazy) == codes(eager) and codes(lazy)


def test_indexed_grant_check_agrees_with_the_full_decision(tmp_path: Path, kit: Kit) -> None:
    hosts = [GenHost("src", "eu"), GenHost("eu-a", "eu")]
    vms = [GenVM("w1", "src", "alice", ("eu",), labels=("web",)),
           GenVM("w2", "src", "bob", ("eu",), labels=("web",)),
           GenVM("d1", "src", "alice", ("eu",), labels=("db",)), GenVM("n1", "src", "alice", ("eu",))]
    g = generate(tmp_path, hosts, vms, kit=kit)
    svc = g.service()
    for admin in ("anne", "nobody"):
        for declared in (True, False):
            ev = EvacuationService(svc, admin=admin, emergencies={"src"} if declared else ())
            planned = ev.plan(["src"])
            for v in g.vms.values():
                full = svc.explain(v.uuid, "eu-a", admin, emergency=declared)
                grant_ok = not any(r.code.startswith("grant.") for r in full.reasons if r.severity == "error")
                assert (v.name in {m.vm.name for m in planned.moves}) == grant_ok, (admin, v.name)
    # anne's emergency-only grant from alice covers label web: w1 only (w2 is bob's)
    declared = EvacuationService(svc, admin="anne", emergencies={"src"}).plan(["src"])
    assert {m.vm.name for m in declared.moves} == {"w1"}


class LyingMover(FakeMover):
    """Reports the opposite of what happened: the outcome is judged by where the VM runs."""

    async def move(self, move: Move, *, admin: str | None, on_progress: object,
                   abort: asyncio.Event) -> Outcome:
        if move.vm.name == "vm00":  # an abort that came too late: it did move
            self.world[move.vm.uuid] = move.target
            return Outcome("aborted", move.vm.source, "aborted")
        if move.vm.name == "vm01":  # "success", but the VM is nowhere to be found running
            self.world[move.vm.uuid] = "nowhere"
            return Outcome("success", move.target)
        return Outcome("failed", move.vm.source, "boom")  # and it stays where it was


def test_the_summary_trusts_where_the_vm_runs_not_what_was_reported(tmp_path: Path, kit: Kit) -> None:
    g = many(tmp_path, kit, n=3)
    world = {v.uuid: v.host for v in g.vms.values()}
    ev = EvacuationService(g.service(), mover=LyingMover(world), locator=FakeLocator(world))
    summary = asyncio.run(ev.start(ev.plan(["src", "src2"])).run())
    assert [u.name for u in summary.moved] == ["vm00"] and "found running on" in summary.moved[0].message
    rows = {u.name: u for u in summary.failed}
    assert rows["vm01"].vm_on == "" and "reconcile" in rows["vm01"].message
    assert rows["vm02"].vm_on == rows["vm02"].source and "still running on" in summary.text()
    assert "NOT verified" in summary.text()


def test_retarget_within_the_allowed_set_and_limits_for_parallel(tmp_path: Path, kit: Kit) -> None:
    g = small(tmp_path, kit)
    planned = EvacuationService(g.service()).plan(["src"])
    move = planned.find("web-1")
    other = "eu-a" if move.target != "eu-a" else "eu-b"
    assert planned.retarget("web-1", other) is None and planned.find("web-1").target == other
    refused = planned.retarget("web-2", "us-a")  # web-2 trusts only the EU CA
    assert refused is not None and refused.code == "plan.not_allowed"
    assert Limits.for_parallel(1) == Limits(1, 1, 1)
    assert Limits.for_parallel(None) == Limits(10, 4, 2)
    with pytest.raises(InputError):
        Limits.for_parallel(0)
