"""The migration engine's control flow without a lab: fake hosts, real service code.

The fakes stand in for libvirt's connections and domains only (migrate3 blocks until
the test releases it or an abort arrives; jobStats reports a counter the test can
freeze). Everything else — the run, progress publication, watchdog, abort, the
unstick after a dead link, verification and the audit log — is the service's own
code. The lab tests (tests/integration/test_migration_lab.py) do the same against
real QEMU.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from console.adapters.audit import AuditLog, read_entries, verify_file
from console.adapters.ssh import LIBVIRT_DOWN, HostProblem
from console.core import migration as mig
from console.core.errors import EscortError, ReadOnlyError
from console.core.inventory import AdminSpec, HostSpec, VMView
from console.core.reasons import Reason
from console.services.identity import AdminIdentity
from console.services.migration import MigrationRefused, MigrationRun, MigrationService
from tests.unit.adminkeys import make_key

UUID = "6b1a2c3d-0000-4000-8000-000000000001"
MIB = 1024 * 1024


def _err(msg: str, code: int = libvirt.VIR_ERR_OPERATION_FAILED) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(msg)
    exc.err = (code, 10, msg, 2, None, None, None, 0, 0)
    return exc


class World:
    """Two hosts, one VM, and knobs for the test."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {"src": "running"}  # host -> state of the VM there
        self.processed = 0
        self.frozen = False  # jobStats stops advancing (a cut link)
        self.release = threading.Event()  # the copy may finish
        self.ignore_abort = False  # migrate3 does not return after abortJob (dead link)
        self.dropped = threading.Event()  # the console closed its connection to the target
        self.aborts = 0
        self.migrate_calls = 0
        self.finish_s = 0.0  # Finish/Confirm after the copy: the source job is gone meanwhile
        self.stats_hang = threading.Event()  # jobStats blocks (the source's link is dead) ...
        self.stats_free = threading.Event()  # ... until this is set
        self.free_mib = 4096  # what the target's libvirt reports free
        self.total_mib = 64 * 1024  # the target's memory (getInfo)
        self.promised_mib = 0  # memory given to an active domain already on the target
        self.down: dict[str, HostProblem] = {}  # host -> why it cannot be asked (verification)
        self.silent: set[str] = set()  # hosts that never answer (a cut link)
        self.target_daemon_dead = threading.Event()  # the target's libvirtd died mid-way
        self.asks: list[str] = []  # hosts asked where the VM is
        self.lost_finish = False  # the target ran the VM but its answer never came back


class FakeDom:
    def __init__(self, world: World, host: str) -> None:
        self.world, self.host = world, host

    def migrate3(self, dconn: FakeConn, params: dict[str, Any], flags: int) -> FakeDom:
        w = self.world
        w.migrate_calls += 1
        assert flags & libvirt.VIR_MIGRATE_TLS and params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION]
        while True:
            if w.dropped.is_set():
                raise _err("End of file while reading data: Input/output error")
            if w.target_daemon_dead.is_set() and w.aborts:
                raise _err("operation aborted: job 'migration out' canceled by client",
                           libvirt.VIR_ERR_OPERATION_ABORTED)
            if w.aborts and not w.ignore_abort:
                raise _err("operation aborted: job 'migration out' canceled by client",
                           libvirt.VIR_ERR_OPERATION_ABORTED)
            if w.release.is_set() and w.lost_finish:
                time.sleep(w.finish_s)
                w.where[dconn.host] = "running"  # Finish resumed it, but its answer was lost ...
                w.silent.add(dconn.host)
                raise _err("End of file while reading data: Input/output error",
                           libvirt.VIR_ERR_SYSTEM_ERROR)  # ... and Confirm resumed the source
            if w.release.is_set():
                time.sleep(w.finish_s)
                del w.where["src"]
                w.where[dconn.host] = "running"
                return FakeDom(w, dconn.host)
            time.sleep(0.01)

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        w = self.world
        if flags == libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED:
            return {"type": 3, "downtime": 42, "time_elapsed": 1500, "data_processed": w.processed,
                    "data_total": 100 * MIB}
        if w.stats_hang.is_set():
            w.stats_free.wait(10)
        if w.finish_s and w.release.is_set():
            raise _err("Domain not found", libvirt.VIR_ERR_NO_DOMAIN)
        if not w.frozen and not w.release.is_set():
            w.processed += MIB
        return {"type": 2, "data_total": 100 * MIB, "data_processed": w.processed,
                "data_remaining": 100 * MIB - w.processed, "memory_iteration": 1}

    def abortJob(self) -> int:
        self.world.aborts += 1
        return 0

    def state(self) -> list[int]:
        if self.world.where.get(self.host) == "paused":
            return [libvirt.VIR_DOMAIN_PAUSED, 1]
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def suspend(self) -> int:
        self.world.where[self.host] = "paused"
        return 0

    def resume(self) -> int:
        self.world.where[self.host] = "running"
        return 0

    def isPersistent(self) -> int:
        return 1

    def name(self) -> str:
        return "web"


class FakeConn:
    def __init__(self, world: World, host: str) -> None:
        self.world, self.host = world, host

    def getFreeMemory(self) -> int:
        return self.world.free_mib * MIB

    def getInfo(self) -> list[Any]:  # [model, memory MiB, cpus, ...]
        return ["x86_64", self.world.total_mib, 8, 0, 1, 1, 8, 1]

    def getHostname(self) -> str:
        return self.host

    def listAllDomains(self, flags: int = 0) -> list[Any]:
        # the VM heading here is not on the target yet; a guest given promised_mib is
        return [PromisedDom(self.world.promised_mib)] if self.world.promised_mib else []

    def getLibVersion(self) -> int:
        if self.host == "dst" and self.world.target_daemon_dead.is_set():
            raise _err("Cannot recv data: End of file", libvirt.VIR_ERR_SYSTEM_ERROR)
        return 9000000

    def lookupByUUIDString(self, uuid: str) -> FakeDom:
        if uuid != UUID or self.host not in self.world.where:
            raise _err("Domain not found", libvirt.VIR_ERR_NO_DOMAIN)
        return FakeDom(self.world, self.host)


class PromisedDom:
    """An idle guest on the target: its memory is given to it, not yet touched."""

    def __init__(self, mib: int) -> None:
        self.mib = mib

    def state(self, flags: int = 0) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def info(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, self.mib * 1024, self.mib * 1024, 1, 0]

    def metadata(self, *args: Any) -> str:
        raise _err("no metadata", libvirt.VIR_ERR_NO_DOMAIN_METADATA)

    def UUIDString(self) -> str:
        return "00000000-0000-4000-8000-0000000000aa"

    def name(self) -> str:
        return "ballast"

    def isPersistent(self) -> int:
        return 1


class FakeHost:
    def __init__(self, world: World, name: str) -> None:
        self.name, self.conn = name, FakeConn(world, name)

    async def call(self, fn: Any, *args: Any, timeout: float | None = None) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as exc:
            raise EscortError(f"{self.name}: {exc}") from exc


class FakePool:
    def __init__(self, world: World) -> None:
        self.world = world
        self.dropped: list[str] = []

    async def drop(self, ssh: str, jump: str = "") -> None:
        self.dropped.append(ssh)
        self.world.dropped.set()


class FakeInventory:
    def __init__(self, world: World) -> None:
        self.world = world
        self.pool = FakePool(world)

    def spec(self, name: str) -> HostSpec:
        return HostSpec(name, ssh=f"root@{name}", migration_address="10.0.0.2")

    async def libvirt(self, name: str) -> FakeHost:
        self.world.asks.append(name)
        if name in self.world.down:
            raise self.world.down[name]
        if name in self.world.silent:
            await asyncio.Event().wait()  # never answers (cancelled at the deadline)
        return FakeHost(self.world, name)


class FakeFleet:
    spec = None
    kind = "lab"
    name = "fake"
    path = ""
    admins: tuple[AdminSpec, ...] = ()

    def __init__(self, readonly: bool = False) -> None:
        self.readonly = readonly

    def require_writable(self, action: str) -> None:
        if self.readonly:
            raise ReadOnlyError(f"read-only mode: {action} is disabled")

    def vms(self) -> list[VMView]:
        return [VMView(UUID, "web", "src", "running", memory_mib=64, vcpus=1)]


def _entries(path: Path) -> list[dict[str, Any]]:
    """The log's entries without the admin's signature entries (test_audit_signatures.py)."""
    return [e for e in read_entries(path) if e["kind"] != "signature"]


def _preflight(ok: bool = True) -> mig.Preflight:
    items = {k: mig.passed(k) for k, _ in mig.CHECKS}
    if not ok:
        items["grant"] = mig.failed("grant", Reason("grant.missing", "no grant names admin 'ops'"))
    plan = mig.MigrationPlan(UUID, "web", "src", "dst", "dst.example", "tcp://10.0.0.2", "ab" * 32,
                             admin="ops", policy_hash="p" * 64, grant_id="g-1")
    return mig.assemble("web", UUID, "src", "dst", "ops", dt.datetime.now(dt.UTC), items, plan, 0.01,
                        policy_hash="p" * 64, grant_id="g-1", cert_fingerprint="ab" * 32)


class Service(MigrationService):
    """The real service; only the just-in-time certificate and decision re-checks are
    left out, because these fakes have no certificates, policies or grants (the lab
    tests run them for real: test_certificate_swapped_after_preflight_is_refused_at_start).
    The just-in-time capacity check runs as is."""

    async def _jit_certificate(self, run: Any) -> list[Reason]:
        return []

    def _jit_decision(self, run: Any) -> list[Reason]:
        return []


def _service(tmp_path: Path, world: World, *, fleet: FakeFleet | None = None,
             **kw: Any) -> MigrationService:
    opts: dict[str, Any] = {"poll_interval_s": 0.02, "stall_timeout_s": 5.0, "finish_grace_s": 5.0,
                            "settle_s": 30.0, **kw}  # a deadline only: both answer at once
    fleet = fleet or FakeFleet()
    # the acting admin "ops" and a real key of theirs (the proof of possession really runs)
    key, fp = make_key(tmp_path, "ops")
    fleet.admins = (AdminSpec("ops", fp),)
    identity = AdminIdentity(fleet, admin_key=str(key), agent_path="")  # type: ignore[arg-type]
    return Service(fleet, FakeInventory(world),  # type: ignore[arg-type]
                   audit=AuditLog(tmp_path / "audit.log"), identity=identity, **opts)


async def _when(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_success_publishes_progress_verifies_and_audits(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    run = await svc.start(svc._issue(_preflight()))
    seen: list[mig.Progress] = []
    run.subscribe(lambda _r, p: seen.append(p))
    await _when(lambda: world.processed >= 5 * MIB)
    world.release.set()
    result = await run.wait()
    await svc.close()
    assert result.outcome.result == "success" and result.outcome.vm_on == "dst"
    assert result.outcome.downtime_ms == 42 and world.where == {"dst": "running"}
    assert seen[-1].phase == "completed" and any(p.phase == "copying" for p in seen)
    assert [p.phase for p in [x async for x in run.updates()]] == ["completed"]  # ended: latest only
    assert verify_file(tmp_path / "audit.log").ok
    decision, outcome = _entries(tmp_path / "audit.log")
    assert (decision["kind"], decision["allowed"], decision["grant_id"]) == ("decision", True, "g-1")
    assert (outcome["result"], outcome["vm_on"], outcome["downtime_ms"]) == ("success", "dst", 42)


async def test_decision_is_on_disk_before_libvirt_is_asked(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    log = tmp_path / "audit.log"
    seen_at_call: list[list[str]] = []
    real = FakeDom.migrate3

    def spy(self: FakeDom, dconn: FakeConn, params: dict[str, Any], flags: int) -> FakeDom:
        seen_at_call.append([e["kind"] for e in _entries(log)])
        return real(self, dconn, params, flags)

    FakeDom.migrate3 = spy  # type: ignore[method-assign]
    try:
        world.release.set()
        run = await svc.start(svc._issue(_preflight()))
        await run.wait()
    finally:
        FakeDom.migrate3 = real  # type: ignore[method-assign]
        await svc.close()
    assert seen_at_call == [["decision"]]


async def test_admin_abort(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    await run.abort("admin")
    result = await run.wait()
    await svc.close()
    assert world.aborts == 1
    assert (result.outcome.result, result.outcome.vm_on) == ("aborted", "src")
    assert result.progress.phase == "aborted" and "still running on src" in result.outcome.message
    assert _entries(tmp_path / "audit.log")[-1]["aborted_by"] == "admin"


async def test_watchdog_aborts_a_frozen_migration(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world, stall_timeout_s=0.3)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.frozen = True
    t0 = time.monotonic()
    result = await asyncio.wait_for(run.wait(), 10)
    await svc.close()
    assert time.monotonic() - t0 >= 0.3
    assert run.abort_requested == "watchdog" and world.aborts == 1
    assert result.outcome.result == "failed" and result.outcome.reasons[0].code == "migration.stalled"
    assert result.outcome.vm_on == "src"
    last = _entries(tmp_path / "audit.log")[-1]
    assert last["watchdog"] is True and last["reasons"][0]["code"] == "migration.stalled"


async def test_dead_link_after_abort_is_unstuck_by_closing_the_target_connection(tmp_path: Path) -> None:
    world = World()
    world.ignore_abort = True  # libvirt's Finish on the target would wait for TCP
    svc = _service(tmp_path, world, stall_timeout_s=0.2, finish_grace_s=0.2)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 2 * MIB)
    world.frozen = True
    result = await asyncio.wait_for(run.wait(), 10)
    await svc.close()
    assert svc.inventory.pool.dropped == ["root@dst"]  # type: ignore[attr-defined]
    assert result.outcome.result == "failed" and result.outcome.vm_on == "src"


async def test_refused_preflight_never_reaches_libvirt_and_is_audited(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    with pytest.raises(MigrationRefused, match="no grant"):
        await svc.start(svc._issue(_preflight(ok=False)))
    await svc.close()
    assert world.migrate_calls == 0 and svc.runs == {}
    (entry,) = _entries(tmp_path / "audit.log")
    assert entry["allowed"] is False and entry["reasons"][0]["code"] == "grant.missing"
    assert entry["grant_id"] == "g-1" and entry["target_cert_sha256"] == "ab" * 32


async def test_readonly_refuses_before_anything(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world, fleet=FakeFleet(readonly=True))
    with pytest.raises(ReadOnlyError):
        await svc.start(svc._issue(_preflight()))
    await svc.close()
    assert world.migrate_calls == 0
    assert not (tmp_path / "audit.log").exists() or _entries(tmp_path / "audit.log") == []


async def test_slow_subscriber_gets_the_latest_state_not_a_backlog(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    run = await svc.start(svc._issue(_preflight()))
    got: list[mig.Progress] = []

    async def slow_reader() -> None:
        async for p in run.updates():
            got.append(p)
            await asyncio.sleep(0.15)

    reader = asyncio.create_task(slow_reader())
    await _when(lambda: world.processed >= 20 * MIB)
    world.release.set()
    await run.wait()
    await asyncio.wait_for(reader, 5)
    await svc.close()
    assert got[-1].phase == "completed"
    assert len(got) < run._version  # skipped intermediate states instead of queueing them


async def test_watchdog_fires_even_while_jobstats_hangs(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world, stall_timeout_s=0.3)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.stats_hang.set()
    try:
        result = await asyncio.wait_for(run.wait(), 10)
    finally:
        world.stats_free.set()
        await svc.close()
    assert run.abort_requested == "watchdog" and world.aborts == 1
    assert result.outcome.reasons[0].code == "migration.stalled" and result.outcome.vm_on == "src"


async def test_watchdog_stands_down_once_the_copy_is_over(tmp_path: Path) -> None:
    """Finish/Confirm send no data: a slow finish is not a stall (cutting the target's
    connection then would roll back a migration that was about to succeed)."""
    world = World()
    world.finish_s = 1.0
    svc = _service(tmp_path, world, stall_timeout_s=0.3, finish_grace_s=0.2)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.release.set()
    result = await asyncio.wait_for(run.wait(), 10)
    await svc.close()
    assert run.abort_requested == "" and world.aborts == 0
    assert svc.inventory.pool.dropped == []  # type: ignore[attr-defined]
    assert result.outcome.result == "success" and result.outcome.vm_on == "dst"


# -- start() accepts only its own, complete, fresh pre-flight ------------------------------------
async def test_start_refuses_a_preflight_it_did_not_produce(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    pf = _preflight()
    with pytest.raises(MigrationRefused, match="not produced"):
        await svc.start(pf)  # hand-made: never issued by svc.preflight
    svc._issue(pf)
    world.release.set()
    run = await svc.start(pf)
    await run.wait()
    with pytest.raises(MigrationRefused, match="not produced"):
        await svc.start(pf)  # used once: not again
    await svc.close()
    assert world.migrate_calls == 1


async def test_zero_checks_never_pass(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    full = _preflight()
    empty = mig.Preflight("web", UUID, "src", "dst", "ops", dt.datetime.now(dt.UTC), (), full.plan)
    assert not empty.ok
    with pytest.raises(MigrationRefused):
        await svc.start(svc._issue(empty))
    await svc.close()
    assert world.migrate_calls == 0
    assert [e["allowed"] for e in _entries(tmp_path / "audit.log")] == [False]


async def test_an_old_preflight_is_refused(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world)
    old = _preflight()
    old = mig.assemble("web", UUID, "src", "dst", "ops", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120),
                       {i.key: i for i in old.items}, old.plan, policy_hash="p" * 64, grant_id="g-1",
                       cert_fingerprint="ab" * 32)
    with pytest.raises(MigrationRefused, match="old"):
        await svc.start(svc._issue(old))
    await svc.close()
    assert world.migrate_calls == 0


# -- just in time: the target's room, counting migrations already heading there ----------------
async def test_room_promised_to_a_migration_in_this_process_is_not_given_twice(tmp_path: Path) -> None:
    world = World()
    world.free_mib = 100  # room for one 64 MiB VM, not two
    svc = _service(tmp_path, world)
    other = mig.MigrationPlan("00000000-0000-4000-8000-00000000000f", "big", "src2", "dst", "dst.example",
                              "tcp://10.0.0.2", "ab" * 32, admin="ops")
    heading = MigrationRun("other", _preflight(), other)
    heading.memory_mib, heading.reserved = 64, True
    svc.runs["other"] = heading
    assert svc._reservations_file() is not None
    svc._reservations_file().reserve("other", "dst", 64, lambda _p: True)  # as its start did
    run = await svc.start(svc._issue(_preflight()))
    result = await run.wait()
    await svc.close()
    assert result.outcome.result == "refused" and world.migrate_calls == 0
    assert [r.code for r in result.outcome.reasons] == ["migration.no_memory"]
    assert world.where == {"src": "running"}


async def test_memory_given_to_idle_guests_counts_as_taken_just_in_time(tmp_path: Path) -> None:
    """The kernel still sees a lazily-touched guest's memory as free; the check right before
    migrate3 counts it as taken, as the evacuation planner does (core.evacuation.memory_room)."""
    world = World()
    world.free_mib, world.total_mib, world.promised_mib = 4096, 1024, 1000  # 24 MiB of real room
    svc = _service(tmp_path, world)
    run = await svc.start(svc._issue(_preflight()))
    result = await run.wait()
    assert result.outcome.result == "refused" and world.migrate_calls == 0
    assert [r.code for r in result.outcome.reasons] == ["migration.no_memory"]
    assert "24 MiB free" in result.outcome.reasons[0].message
    world.promised_mib = 512  # now it fits
    world.release.set()
    run = await svc.start(svc._issue(_preflight()))
    result = await run.wait()
    await svc.close()
    assert result.outcome.result == "success" and world.migrate_calls == 1


async def test_room_promised_by_another_process_is_not_given_twice(tmp_path: Path) -> None:
    """Two consoles on one fleet (or two services in one) share the reservations next to the
    audit log."""
    import os

    from console.adapters.reservations import Reservations

    world = World()
    world.free_mib = 100
    shared = Reservations(tmp_path / "audit.log.reservations")
    # a live process other than this one (our parent) holds 64 MiB on dst
    assert shared.reserve("elsewhere", "dst", 64, lambda _o: True) is True
    rows = __import__("json").loads(shared.path.read_text())
    rows[0]["pid"] = os.getppid()
    shared.path.write_text(__import__("json").dumps(rows))
    svc = _service(tmp_path, world)
    run = await svc.start(svc._issue(_preflight()))
    result = await run.wait()
    assert result.outcome.result == "refused" and world.migrate_calls == 0
    assert "promised" in result.outcome.reasons[0].message
    shared.release("elsewhere")
    world.release.set()
    run = await svc.start(svc._issue(_preflight()))
    result = await run.wait()
    await svc.close()
    assert result.outcome.result == "success" and world.migrate_calls == 1
    assert shared.others("dst") == 0  # released at the end


# -- after a failure: what is known, said as such (issue 14) ---------------------------------
async def test_target_gone_after_completion_is_unknown_not_not_running(tmp_path: Path) -> None:
    """libvirt said success, then the target's libvirtd died: the VM is gone from the
    source (checked), the target could not be asked — unknown, never "not running".
    A huge deadline proves verification returned as soon as the target was known gone."""
    world = World()
    svc = _service(tmp_path, world, settle_s=3600)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.down["dst"] = HostProblem(LIBVIRT_DOWN, "dst: libvirt down: no libvirt daemon answered")
    world.release.set()
    result = await asyncio.wait_for(run.wait(), 30)
    await svc.close()
    out = result.outcome
    assert (out.result, out.vm_state, out.vm_on) == ("unknown", "unknown", "")
    assert "not running" not in out.message and "UNKNOWN" in out.message
    assert "check dst" in out.next_step and "escort reconcile" in out.next_step
    src, dst = out.hosts
    assert (src.host, src.answered, src.copy) == ("src", True, None)
    assert (dst.host, dst.answered, dst.gone) == ("dst", False, True) and "libvirt down" in dst.problem
    entry = _entries(tmp_path / "audit.log")[-1]
    assert entry["vm_state"] == "unknown" and entry["next_step"] == out.next_step
    assert entry["hosts"] == [{"host": "src", "role": "source", "checked": True, "state": "absent"},
                              {"host": "dst", "role": "target", "checked": False, "state": "unknown",
                               "problem": dst.problem}]
    assert "host.libvirt_down" not in [r["code"] for r in entry["reasons"]]
    assert "migration.host_unverified" in [r["code"] for r in entry["reasons"]]
    assert verify_file(tmp_path / "audit.log").ok


async def test_target_daemon_dies_mid_copy_escort_cancels_and_reports_stayed(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world, settle_s=3600)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.target_daemon_dead.set()
    world.down["dst"] = HostProblem(LIBVIRT_DOWN, "dst: libvirt down: no libvirt daemon answered")
    result = await asyncio.wait_for(run.wait(), 30)
    await svc.close()
    out = result.outcome
    assert world.aborts == 1 and run.abort_requested == ""  # escort cancelled, nobody aborted
    assert (out.result, out.vm_state, out.vm_on) == ("failed", "stayed", "src")
    assert "stopped answering" in out.message and "still running on src (checked)" in out.message
    assert "dst could not be asked" in out.message and "incoming copy" in out.message
    assert "check it" in out.next_step


async def test_silent_host_countdown_and_stop_waiting(tmp_path: Path) -> None:
    world = World()
    svc = _service(tmp_path, world, settle_s=3600)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.silent.add("dst")
    world.release.set()
    messages: list[str] = []
    run.subscribe(lambda _r, p: messages.append(p.message))
    await _when(lambda: any("waiting for dst" in m for m in messages), timeout=10)
    waiting = next(m for m in messages if "waiting for dst" in m)
    assert "s left" in waiting and "stop waiting" in waiting
    await run.abort("admin")  # during verification: stops waiting, cancels nothing
    result = await asyncio.wait_for(run.wait(), 10)
    await svc.close()
    out = result.outcome
    assert world.aborts == 0 and run.stopped_waiting == "admin"
    assert (out.result, out.vm_state) == ("unknown", "unknown")
    assert "admin stopped waiting" in out.hosts[1].problem
    assert _entries(tmp_path / "audit.log")[-1]["stopped_waiting"] == "admin"


async def test_libvirt_error_after_switchover_but_vm_moved_is_success(tmp_path: Path) -> None:
    """Confirm failed after the target resumed the VM: libvirt raised, the VM moved."""
    world = World()
    svc = _service(tmp_path, world, settle_s=3600)
    real = FakeDom.migrate3

    def moved_then_error(self: FakeDom, dconn: FakeConn, params: dict[str, Any], flags: int) -> FakeDom:
        real(self, dconn, params, flags)
        raise _err("Cannot recv data: End of file", libvirt.VIR_ERR_SYSTEM_ERROR)

    FakeDom.migrate3 = moved_then_error  # type: ignore[method-assign]
    try:
        world.release.set()
        run = await svc.start(svc._issue(_preflight()))
        result = await asyncio.wait_for(run.wait(), 30)
    finally:
        FakeDom.migrate3 = real  # type: ignore[method-assign]
        await svc.close()
    out = result.outcome
    assert (out.result, out.vm_state, out.vm_on) == ("success", "moved", "dst")
    assert "libvirt reported an error after the switch-over" in out.message


async def test_lost_finish_answer_fences_the_source(tmp_path: Path) -> None:
    """The target resumed the VM, its answer was lost, libvirt's client resumed the source
    (Confirm "cancelled"): escort pauses the source so the VM never runs twice, reports
    unknown, and reconcile later removes the paused copy once the target shows it runs."""
    world = World()
    world.finish_s = 0.5
    world.lost_finish = True
    svc = _service(tmp_path, world, settle_s=0.5)
    run = await svc.start(svc._issue(_preflight()))
    await _when(lambda: world.processed >= 3 * MIB)
    world.release.set()
    result = await asyncio.wait_for(run.wait(), 30)
    out = result.outcome
    assert world.where == {"src": "paused", "dst": "running"}  # never both running after escort
    assert (out.result, out.vm_state, run.fenced) == ("unknown", "unknown", "src")
    assert "escort paused web on src" in out.message and "migration.fenced" in [r.code for r in out.reasons]
    entries = _entries(tmp_path / "audit.log")
    assert [e["kind"] for e in entries] == ["decision", "fence", "outcome"]
    assert entries[-1]["fenced"] == "src"
    assert svc._fenced() == {(UUID, "src")}
    await svc.close()
    assert verify_file(tmp_path / "audit.log").ok


async def test_lost_finish_but_target_answers_without_the_vm_resumes_the_source(tmp_path: Path) -> None:
    world = World()
    world.finish_s = 0.5
    svc = _service(tmp_path, world)
    real = FakeDom.migrate3

    def finish_failed(self: FakeDom, dconn: FakeConn, params: dict[str, Any], flags: int) -> FakeDom:
        while not world.release.is_set():
            time.sleep(0.01)
        time.sleep(world.finish_s)
        raise _err("End of file while reading data: Input/output error", libvirt.VIR_ERR_SYSTEM_ERROR)

    FakeDom.migrate3 = finish_failed  # type: ignore[method-assign]
    try:
        run = await svc.start(svc._issue(_preflight()))
        await _when(lambda: world.processed >= 3 * MIB)
        world.release.set()
        result = await asyncio.wait_for(run.wait(), 30)
    finally:
        FakeDom.migrate3 = real  # type: ignore[method-assign]
        await svc.close()
    out = result.outcome
    assert world.where == {"src": "running"} and run.fenced == ""
    assert (out.result, out.vm_state, out.vm_on) == ("failed", "stayed", "src")
    kinds = [(e["kind"], e.get("action")) for e in _entries(tmp_path / "audit.log")]
    assert kinds == [("decision", None), ("fence", "pause"), ("fence", "resume"), ("outcome", None)]


async def test_concurrent_just_in_time_checks_release_the_room_when_the_certificate_refuses(
        tmp_path: Path) -> None:
    """The certificate re-read and the room check run at the same time; when the certificate
    refuses, the room the capacity check reserved meanwhile is given back at once (not only
    when the run ends), and libvirt is never asked."""
    world = World()
    world.free_mib = 100  # room for one 64 MiB VM
    svc = _service(tmp_path, world)
    changed = Reason("migration.cert_changed", "dst now presents another certificate")
    reserved_meanwhile: list[bool] = []
    pf = svc._issue(_preflight())
    assert pf.plan is not None
    run = MigrationRun("r1", pf, pf.plan)
    run.memory_mib = 64

    async def refusing_cert(_run: Any) -> list[Reason]:
        await asyncio.sleep(0.05)  # the room check runs (and reserves) meanwhile
        reserved_meanwhile.append(run.reserved)
        return [changed]

    svc._jit_certificate = refusing_cert  # type: ignore[method-assign]
    dst = await svc.inventory.libvirt("dst")
    reasons = await svc._just_in_time(run, dst)
    assert [r.code for r in reasons] == ["migration.cert_changed"]
    assert reserved_meanwhile == [True]  # both ran at the same time
    assert not run.reserved  # ... and the room was given back before returning
    shared = svc._reservations_file()
    assert shared is not None
    assert shared.reserve("probe", "dst", 64, lambda promised: promised == 0)  # nothing promised
    shared.release("probe")
    await svc.close()
    assert world.migrate_calls == 0
