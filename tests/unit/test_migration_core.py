"""Pre-flight, plan flags, progress maths, watchdog and reconcile advice (pure core)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import libvirt
import pytest
from click.testing import CliRunner

from console.cli import main
from console.core import migration as m
from console.core.inventory import DomainFacts
from console.core.issuance import (
    CASpec,
    HostSpec,
    Issuer,
    Subject,
    Validity,
    issue_ca,
    issue_host,
    make_key,
)
from console.core.reasons import Reason

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> Issuer:
    key = make_key()
    cert = issue_ca(CASpec(Subject("Test Root")), key, Validity.days(3650, start=NOW - dt.timedelta(days=1)))
    return Issuer(cert, key)


def _host(ca: Issuer, name: str = "hostb", *, days: float = 30, ips: tuple[str, ...] = ("10.0.1.2",),
          start: dt.datetime | None = None):  # type: ignore[no-untyped-def]
    return issue_host(HostSpec(name, dns_names=(f"{name}.lab",), ips=ips), make_key(), ca,
                      Validity.days(days, start=start or NOW - dt.timedelta(days=1)))


def test_constants_match_libvirt() -> None:
    assert m.MIGRATE_LIVE == libvirt.VIR_MIGRATE_LIVE
    assert m.MIGRATE_TLS == libvirt.VIR_MIGRATE_TLS
    assert m.MIGRATE_PERSIST_DEST == libvirt.VIR_MIGRATE_PERSIST_DEST
    assert m.MIGRATE_UNDEFINE_SOURCE == libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert m.MIGRATE_PEER2PEER == libvirt.VIR_MIGRATE_PEER2PEER
    assert m.PARAM_URI == libvirt.VIR_MIGRATE_PARAM_URI
    assert m.PARAM_TLS_DESTINATION == libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION
    assert m.PARAM_BANDWIDTH == libvirt.VIR_MIGRATE_PARAM_BANDWIDTH
    assert m.MIGRATE_PARALLEL == libvirt.VIR_MIGRATE_PARALLEL
    assert m.PARAM_PARALLEL_CONNECTIONS == libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS
    assert (m.JOB_NONE, m.JOB_COMPLETED, m.JOB_CANCELLED) == (
        libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED, libvirt.VIR_DOMAIN_JOB_CANCELLED)


def _plan(**kw: object) -> m.MigrationPlan:
    base: dict[str, object] = dict(vm_uuid="u", vm_name="web", source="a", target="b", tls_name="hostb",
                                   migration_uri="tcp://10.0.1.2", cert_fingerprint="ab" * 32)
    base.update(kw)
    return m.MigrationPlan(**base)  # type: ignore[arg-type]


def test_plan_always_has_tls_and_explicit_uri() -> None:
    plan = _plan(bandwidth_mib_s=8)
    assert plan.flags & libvirt.VIR_MIGRATE_TLS
    assert plan.flags == (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_TLS
                          | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    assert plan.params() == {"migrate_uri": "tcp://10.0.1.2", "tls.destination": "hostb", "bandwidth": 8}
    assert plan.flag_names() == ["LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "TLS"]
    with pytest.raises(ValueError, match="TLS"):
        _plan(flags=m.MIGRATE_LIVE | m.MIGRATE_PERSIST_DEST)
    with pytest.raises(ValueError, match="TLS name"):
        _plan(tls_name="")
    with pytest.raises(ValueError, match="explicit"):
        _plan(migration_uri="")
    assert "bandwidth" not in _plan().params()


def test_plan_with_multifd_channels_keeps_tls_and_the_pinned_name() -> None:
    plan = _plan(channels=4)
    assert plan.flags & libvirt.VIR_MIGRATE_TLS and plan.flags & libvirt.VIR_MIGRATE_PARALLEL
    assert plan.params() == {"migrate_uri": "tcp://10.0.1.2", "tls.destination": "hostb",
                             "parallel.connections": 4}
    assert plan.flag_names() == ["LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "TLS", "PARALLEL"]
    assert plan.as_json()["channels"] == 4
    for one in (0, 1):  # one stream: no PARALLEL flag, no parameter
        single = _plan(channels=one)
        assert not single.flags & libvirt.VIR_MIGRATE_PARALLEL
        assert "parallel.connections" not in single.params()
        assert single.as_json()["channels"] == 1
    with pytest.raises(ValueError, match="channels"):
        _plan(channels=256)
    with pytest.raises(ValueError, match="TLS"):  # multifd never stands in for TLS
        _plan(channels=2, flags=m.MIGRATE_LIVE | m.MIGRATE_PERSIST_DEST)


def test_migration_uri_brackets_ipv6() -> None:
    assert m.migration_uri("10.0.0.2") == "tcp://10.0.0.2"
    assert m.migration_uri("fd00::2", 49152) == "tcp://[fd00::2]:49152"
    assert m.migration_uri("hostb.lab") == "tcp://hostb.lab"


def test_tls_name_comes_from_the_checked_certificate(ca: Issuer) -> None:
    cert = _host(ca)
    assert m.tls_name_for(cert) == ("hostb", None)
    assert m.tls_name_for(cert, "hostb.lab") == ("hostb.lab", None)
    assert m.tls_name_for(cert, "10.0.1.2") == ("10.0.1.2", None)
    name, reason = m.tls_name_for(cert, "other")
    assert name == "" and reason is not None and reason.code == "migration.tls_name"


def test_certificate_pin_and_lifetime(ca: Issuer) -> None:
    cert = _host(ca)
    ok = m.check_certificate(cert, cert, at=NOW, duration_s=120)
    assert ok.ok and m.fingerprint(cert) in ok.detail
    other = _host(ca)  # same name, same CA, different key: still refused
    changed = m.check_certificate(cert, other, at=NOW, duration_s=120)
    assert not changed.ok and [r.code for r in changed.reasons] == ["migration.cert_changed"]
    short = _host(ca, days=1 / 24 / 60 * 70, start=NOW - dt.timedelta(minutes=60))  # 10 min left
    expiring = m.check_certificate(short, short, at=NOW, duration_s=120, margin_s=600)
    assert [r.code for r in expiring.reasons] == ["migration.cert_expiring"]
    assert m.check_certificate(short, short, at=NOW, duration_s=60, margin_s=60).ok
    expired = m.check_certificate(short, short, at=NOW + dt.timedelta(hours=1), duration_s=60)
    assert "has expired" in expired.reasons[0].message
    unread = m.check_certificate(cert, None, at=NOW, duration_s=60,
                                 presented_problem=Reason("ssh.down", "hostb: connection refused"))
    assert not unread.ok and unread.reasons[0].code == "ssh.down"
    unchecked = m.check_certificate(None, cert, at=NOW, duration_s=60)
    assert unchecked.reasons[0].code == "migration.cert_unchecked"


def test_capacity_reachability_and_running() -> None:
    assert m.check_capacity("b", free_memory_mib=1024, cpus=2, memory_mib=512, vcpus=2).ok
    tight = m.check_capacity("b", free_memory_mib=1024, cpus=2, memory_mib=512, vcpus=4,
                             reserved_memory_mib=600)
    assert sorted(r.code for r in tight.reasons) == ["migration.no_cpus", "migration.no_memory"]
    down = m.check_reachable("a", True, None, "b", False, Reason("ssh.refused", "connection refused"))
    assert not down.ok and "b: connection refused" in down.reasons[0].message
    assert m.check_reachable("a", True, None, "b", True, None).ok
    assert m.check_running("web", "a", DomainFacts("u", "web", "running")).ok
    paused = m.check_running("web", "a", DomainFacts("u", "web", "paused", "migration"))
    assert paused.reasons[0].code == "migration.vm_not_running" and "migration" in paused.reasons[0].message
    assert m.check_running("web", "a", None).reasons[0].code == "migration.vm_missing"


def test_decision_reasons_are_sorted_into_items() -> None:
    split = m.split_decision_reasons([Reason("policy.expired", "x"), Reason("grant.missing", "y"),
                                      Reason("attr.country", "z"), Reason("cert.expired", "w")])
    assert [r.code for r in split["policy"]] == ["policy.expired"]
    assert [r.code for r in split["grant"]] == ["grant.missing"]
    assert [r.code for r in split["allowed"]] == ["attr.country", "cert.expired"]


def test_preflight_refuses_with_every_reason_and_keeps_order() -> None:
    items: dict[m.CheckKey, m.CheckItem] = {
        "policy": m.passed("policy"),
        "allowed": m.failed("allowed", Reason("attr.country", "country US not in {DE}")),
        "grant": m.failed("grant", Reason("grant.expired", "grant expired")),
        "capacity": m.passed("capacity"),
    }
    pf = m.assemble("web", "u", "a", "b", "alice", NOW, items, _plan())
    assert not pf.ok and pf.plan is None  # a refused pre-flight never carries a plan
    assert [i.key for i in pf.items] == [k for k, _ in m.CHECKS]
    assert [i.status for i in pf.items] == ["ok", "fail", "fail", "skipped", "skipped", "skipped", "ok"]
    assert [r.code for r in pf.reasons] == ["attr.country", "grant.expired"]
    js = pf.as_json()
    assert js["ok"] is False and js["checks"][1]["reasons"][0]["code"] == "attr.country"
    all_ok = {k: m.passed(k) for k, _ in m.CHECKS}
    good = m.assemble("web", "u", "a", "b", "alice", NOW, all_ok, _plan())
    assert good.ok and good.plan is not None and good.reasons == []


def test_expected_duration_is_pessimistic() -> None:
    assert m.expected_duration_s(64) == 60.0
    assert m.expected_duration_s(4096, 16) == pytest.approx(768.0)


# -- progress -------------------------------------------------------------------------

def _stats(processed: int, remaining: int, total: int = 1000, **kw: int) -> dict[str, int]:
    return {"type": 2, "data_total": total, "data_processed": processed, "data_remaining": remaining, **kw}


def test_progress_ignores_samples_without_totals() -> None:
    t = m.ProgressTracker()
    t.start(0.0)
    p = t.feed({"type": 2, "data_total": 0, "data_processed": 0}, 0.5)
    assert p.phase == "starting" and p.data_total is None and p.rate_history == () and p.fraction is None
    p = t.feed({"type": 0}, 1.0)
    assert p.phase == "starting" and p.elapsed_s == 1.0


def test_progress_rates_eta_and_phases() -> None:
    t = m.ProgressTracker(history=3)
    t.start(10.0)
    p = t.feed(_stats(100, 900, memory_iteration=1), 11.0)
    assert p.phase == "copying" and p.rate_bps == 0.0 and p.eta_s is None  # no rate yet
    p = t.feed(_stats(300, 700, memory_iteration=1), 12.0)
    assert p.rate_bps == 200.0 and p.eta_s == pytest.approx(3.5) and p.fraction == pytest.approx(0.3)
    p = t.feed(_stats(600, 400, memory_iteration=2, memory_bps=250, memory_dirty_rate=0,
                      time_elapsed=2500), 13.0)
    assert p.phase == "converging" and p.rate_bps == 250.0 and p.elapsed_s == 2.5
    assert p.eta_s == pytest.approx(1.6)
    p = t.feed(_stats(700, 300, memory_iteration=3, memory_bps=100, memory_dirty_rate=1,
                      memory_page_size=4096), 14.0)
    assert p.dirty_rate_bps == 4096.0 and p.eta_s is None  # dirtying faster than sending: no ETA
    assert p.rate_history == (200.0, 250.0, 100.0)  # bounded history for the sparkline
    p = t.feed(_stats(800, 10, memory_iteration=3, memory_bps=100), 14.5, source_paused=True)
    assert p.phase == "switchover"
    done = t.complete({"downtime": 87, "time_elapsed": 4200, "data_processed": 1200}, 15.0)
    assert (done.phase, done.downtime_ms, done.elapsed_s, done.data_remaining) == ("completed", 87, 4.2, 0)
    assert done.fraction == 1.0 and done.iteration == 3  # last sample's pass when not reported
    other = m.ProgressTracker()
    other.start(0.0)
    other.feed(_stats(10, 990, memory_iteration=1), 1.0)
    assert other.complete({"memory_iteration": 4, "downtime": 5}).iteration == 4
    # a late sample never reopens a finished migration
    assert t.feed(_stats(1, 999), 16.0).phase == "completed"


def test_progress_failure_keeps_numbers() -> None:
    t = m.ProgressTracker()
    t.start(0.0)
    t.feed(_stats(500, 500, memory_bps=100), 1.0)
    p = t.set_phase("aborted", "operation aborted", at=3.0)
    assert p.phase == "aborted" and p.data_processed == 500 and p.elapsed_s == 3.0 and p.eta_s is None
    assert p.as_json()["message"] == "operation aborted"


# -- watchdog -------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_fires_only_after_no_progress_for_the_timeout() -> None:
    clock = FakeClock()
    dog = m.StallWatchdog(5.0, clock, start_timeout_s=20.0)
    for step in range(10):  # steady progress for 20 s: never fires
        clock.now += 2.0
        assert dog.observe(1000 * (step + 1)) is False
    clock.now += 4.9
    assert dog.observe(10_000) is False
    assert dog.stalled_for() == pytest.approx(4.9)
    clock.now += 0.2
    assert dog.observe(10_000) is True and dog.fired
    assert dog.observe(20_000) is True  # once fired, it stays fired


def test_watchdog_start_phase_uses_the_longer_timeout() -> None:
    clock = FakeClock()
    dog = m.StallWatchdog(5.0, clock, start_timeout_s=20.0)
    clock.now += 19.0
    assert dog.observe(0) is False and dog.observe(None) is False
    clock.now += 1.0
    assert dog.observe(None) is True
    with pytest.raises(ValueError):
        m.StallWatchdog(0, clock)
    assert m.StallWatchdog(30, clock).start_timeout_s == 90


def test_watchdog_ignores_a_processed_counter_that_goes_back() -> None:
    clock = FakeClock()
    dog = m.StallWatchdog(5.0, clock)
    dog.observe(5000)
    clock.now += 3
    dog.observe(4000)  # a new pass reporting less does not count as progress
    clock.now += 2.5
    assert dog.observe(4500) is True


# -- reconcile ------------------------------------------------------------------------

def _d(state: str, reason: str = "", persistent: bool = True) -> DomainFacts:
    return DomainFacts("u1", "web", state, reason, persistent=persistent)


def test_reconcile_nothing_to_do_for_healthy_fleets() -> None:
    assert m.find_reconcile_cases({"a": [_d("running")], "b": []}) == []
    assert m.find_reconcile_cases({"a": [_d("shut off")], "b": [_d("paused", "user")]}) == []


def test_reconcile_paused_source_alone_is_resumed() -> None:
    cases = m.find_reconcile_cases({"a": [_d("paused", "migration")], "b": []})
    assert [(c.code, c.steps) for c in cases] == [("reconcile.paused_source", (("resume", "a"),))]


def test_reconcile_destroys_unfinished_incoming_before_resuming_source() -> None:
    cases = m.find_reconcile_cases({"a": [_d("paused", "migration")],
                                    "b": [_d("paused", "migration", persistent=False)]})
    assert cases[0].steps == (("destroy", "b"), ("resume", "a"))


def test_reconcile_keeps_the_running_copy_and_never_resumes_the_other() -> None:
    cases = m.find_reconcile_cases({"a": [_d("paused", "migration")], "b": [_d("running")]})
    assert cases[0].code == "reconcile.stale_source"
    assert cases[0].steps == (("destroy", "a"), ("undefine", "a"))
    assert all(action != "resume" for action, _ in cases[0].steps)


def test_reconcile_split_brain_has_no_automatic_step() -> None:
    cases = m.find_reconcile_cases({"a": [_d("running")], "b": [_d("running")]}, {"u1": "b"})
    assert cases[0].code == "reconcile.split_brain" and cases[0].steps == ()
    assert "went to b" in cases[0].advice


def test_reconcile_stale_inactive_definition_is_undefined() -> None:
    cases = m.find_reconcile_cases({"a": [_d("shut off")], "b": [_d("running")]})
    assert (cases[0].code, cases[0].steps) == ("reconcile.stale_definition", (("undefine", "a"),))
    assert cases[0].as_json()["copies"] == ["shut off on a", "running on b"]


def test_outcome_json() -> None:
    out = m.Outcome("failed", "a", "link cut", [Reason("migration.stalled", "no progress for 5 s")],
                    {"migrate": 7.1234}, None)
    assert out.as_json()["timings"] == {"migrate": 7.123}
    assert out.as_json()["reasons"][0]["code"] == "migration.stalled"


# -- `escort migrate` on the demo fleet (libvirt test driver: pre-flight only) -----------------

@pytest.fixture(scope="module")
def demo_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from console.demo import ensure_demo

    path, _ = ensure_demo(tmp_path_factory.mktemp("demo") / "fleet")
    return path


def _events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_demo_runs_the_full_preflight_then_explains(demo_fleet: Path) -> None:
    res = CliRunner().invoke(main, ["migrate", "--fleet", str(demo_fleet), "pay-db-01", "fra-02",
                                    "--admin", "oncall", "--yes"])
    assert res.exit_code == 1, res.output
    events = _events(res.output)
    assert [e["event"] for e in events] == ["preflight", "demo"]
    pre = events[0]
    assert pre["ok"] is True and [c["check"] for c in pre["checks"]] == [k for k, _ in m.CHECKS]
    # pay-db-01 has 8 GiB: one TLS stream by default (docs/MIGRATION.md 2b)
    assert pre["plan"]["flags"] == ["LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "TLS"]
    assert pre["plan"]["channels"] == m.default_channels(8192) == 1
    assert events[1]["migrated"] is False and "escort lab" in events[1]["message"]
    assert events[1]["vm_on"] == "fra-01"
    # asked for: multifd, whatever the guest's size
    res = CliRunner().invoke(main, ["migrate", "--fleet", str(demo_fleet), "pay-db-01", "fra-02",
                                    "--admin", "oncall", "--yes", "--channels", "3"])
    pre = _events(res.output)[0]
    assert pre["plan"]["flags"] == ["LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "TLS", "PARALLEL"]
    assert pre["plan"]["channels"] == 3


def test_default_channels_by_guest_memory() -> None:
    """One stream up to SINGLE_STREAM_MAX_MIB (no re-keying risk, no multifd crash on a
    failed move with QEMU 7.2); multifd above it and when the size is unknown."""
    assert m.default_channels(512) == m.default_channels(m.SINGLE_STREAM_MAX_MIB) == 1
    assert m.default_channels(m.SINGLE_STREAM_MAX_MIB + 1) == m.DEFAULT_CHANNELS == 2
    assert m.default_channels(0) == m.DEFAULT_CHANNELS  # size not known


def test_refusal_is_explained_and_audited(demo_fleet: Path) -> None:
    from console.adapters.audit import read_entries, verify_file

    res = CliRunner().invoke(main, ["migrate", "--fleet", str(demo_fleet), "pay-db-01", "ams-02",
                                    "--admin", "oncall", "--json"])
    assert res.exit_code == 1, res.output
    pre, refused = _events(res.output)
    assert pre["ok"] is False and refused["event"] == "refused"
    codes = {r["code"] for r in refused["reasons"]}
    assert {"cert.revoked", "attr.country"} <= codes
    log = demo_fleet.parent / "audit.log"
    assert verify_file(log).ok
    last = read_entries(log)[-1]
    assert (last["kind"], last["allowed"], last["target"]) == ("decision", False, "ams-02")
    assert last["policy_hash"] and last["target_cert_sha256"]


def test_migrate_bad_input_and_readonly(demo_fleet: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(main, ["migrate", "--fleet", str(demo_fleet), "no-such-vm", "fra-02"])
    assert unknown.exit_code == 2 and "no VM" in unknown.output
    no_host = runner.invoke(main, ["migrate", "--fleet", str(demo_fleet), "pay-db-01", "nowhere",
                                   "--admin", "oncall"])
    assert no_host.exit_code == 2 and "no host" in no_host.output
    ro = runner.invoke(main, ["--readonly", "migrate", "--fleet", str(demo_fleet), "pay-db-01",
                              "fra-02", "--admin", "oncall"])
    assert ro.exit_code == 3 and "read-only" in ro.output
    missing = runner.invoke(main, ["migrate", "--fleet", str(demo_fleet.parent / "nope.toml"), "a", "b"])
    assert missing.exit_code == 2


def test_progress_line_for_a_terminal() -> None:
    from console.cli.migrate_cmds import progress_line

    assert progress_line(m.Progress("starting", 1.0)).startswith("starting   waiting for the destination")
    line = progress_line(m.Progress("copying", 65.0, 100 * 2**20, 40 * 2**20, 60 * 2**20, 16 * 2**20,
                                    iteration=1, eta_s=3.75))
    assert "40%" in line and "40.0 MiB sent" in line and "16.0 MiB/s" in line and "01:05" in line
    assert "ETA 00:03" in line


# -- after a migration: three-valued, never "not running" for "could not ask" ---------------
def _seen(host: str, role: str, state: str | None, *, persistent: bool = True, reason: str = "",
          problem: str = "") -> m.HostSeen:
    if problem:
        return m.HostSeen(host, role, False, problem=problem, gone=True)  # type: ignore[arg-type]
    copy = None if state is None else DomainFacts("u", "vm", state, reason, persistent=persistent)
    return m.HostSeen(host, role, True, copy)  # type: ignore[arg-type]


@pytest.mark.parametrize(("src", "dst", "ok", "state", "on", "reconcile"), [
    (("running", True, ""), (None, True, ""), False, "stayed", "S", False),
    ((None, True, ""), ("running", True, ""), True, "moved", "T", False),
    (("paused", True, "migration"), ("running", True, ""), True, "moved", "T", True),
    (("running", True, ""), ("paused", False, "incoming migration"), False, "stayed", "S", True),
    (("running", True, ""), ("down", False, ""), False, "stayed", "S", True),
    (("down", False, ""), ("running", True, ""), False, "moved", "T", True),
    ((None, True, ""), ("down", False, ""), True, "unknown", "", True),
    ((None, True, ""), ("down", False, ""), False, "unknown", "", True),
    (("down", False, ""), ("down", False, ""), False, "unknown", "", True),
    (("running", True, ""), ("running", True, ""), False, "unknown", "", True),
    (("paused", True, "migration"), (None, True, ""), False, "unknown", "", True),
    (("running", True, ""), (None, True, ""), True, "unknown", "", True),  # libvirt said yes: odd
    # resumed by libvirt after a switch-over, target silent: the target may run it too
    (("running", True, "migration canceled"), ("down", False, ""), False, "unknown", "", True),
    (("running", True, "migration canceled"), (None, True, ""), False, "stayed", "S", False),
])
def test_judge_three_values(src: tuple[str | None, bool, str], dst: tuple[str | None, bool, str], ok: bool,
                            state: str, on: str, reconcile: bool) -> None:
    def seen(host: str, role: str, spec: tuple[str | None, bool, str]) -> m.HostSeen:
        what, persistent, reason = spec
        if what == "down":
            return _seen(host, role, None, problem="libvirt down: no daemon")
        return _seen(host, role, what, persistent=persistent, reason=reason)

    v = m.judge("vm", seen("S", "source", src), seen("T", "target", dst), libvirt_ok=ok)
    assert (v.vm_state, v.vm_on, v.needs_reconcile) == (state, on, reconcile), v.summary
    assert "not running" not in v.summary
    for h in v.hosts:
        if not h.answered:  # a silent host is named, with why, and never described as empty
            assert f"{h.host} ({h.role}) could not be asked" in " ".join(v.host_lines())
            assert "could not be asked" in v.summary and h.host in v.summary
            assert h.host in v.next_step
            assert h.as_json()["state"] == "unknown" and h.as_json()["checked"] is False
    if state == "unknown":
        assert v.next_step


def test_a_crashed_source_is_said_plainly_with_a_step_that_exists() -> None:
    """QEMU 7.2 can abort on a TLS multifd migration that fails mid-way (the lab saw the
    source's QEMU die on a yank assertion): the VM is shut off (crashed) on the source and
    absent from the target. reconcile lists no case for a lone shut-off VM, so the next
    step must not send the operator there; it names the host, the log and the restart."""
    v = m.judge("app-1", _seen("fra-1", "source", "shut off", reason="crashed"),
                _seen("par-1", "target", None), libvirt_ok=False)
    assert (v.vm_state, v.vm_on, v.needs_reconcile) == ("unknown", "", True)
    assert "crashed" in v.summary and "fra-1" in v.summary
    assert "reconcile" not in v.next_step
    assert "virsh start app-1" in v.next_step and "fra-1" in v.next_step
    assert m.find_reconcile_cases({"fra-1": [DomainFacts("u", "app-1", "shut off", "crashed")],
                                   "par-1": []}) == []
    # a VM shut off for another reason keeps the general wording
    other = m.judge("app-1", _seen("fra-1", "source", "shut off", reason="destroyed"),
                    _seen("par-1", "target", None), libvirt_ok=False)
    assert "crashed" not in other.summary and "reconcile" in other.next_step


def test_leftover_incoming_copy_is_a_reconcile_item() -> None:
    hosts = {"fra-1": [DomainFacts("u1", "app-1", "running", "", persistent=True)],
             "par-1": [DomainFacts("u1", "app-1", "paused", "incoming migration", persistent=False)]}
    (case,) = m.find_reconcile_cases(hosts)
    assert case.code == "reconcile.leftover_incoming"
    assert case.steps == (("destroy", "par-1"),)
    assert "fra-1" in case.advice


def test_escort_reconcile_on_the_demo_fleet(demo_fleet: Path) -> None:
    """`escort reconcile`: every host asked (libvirt's test driver), JSON shape, exit codes."""
    res = CliRunner().invoke(main, ["reconcile", "--fleet", str(demo_fleet), "--json"])
    data = json.loads(res.output.strip().splitlines()[-1])
    assert set(data) == {"cases", "unverified", "unreachable", "fixed"}
    assert res.exit_code == (0 if not data["cases"] and not data["unreachable"] else 1)
    assert data["fixed"] == []
    res = CliRunner().invoke(main, ["--readonly", "reconcile", "--fleet", str(demo_fleet), "--fix"])
    assert res.exit_code == 3, res.output
    res = CliRunner().invoke(main, ["reconcile"])
    assert res.exit_code == 2 and "--fleet" in res.output


def test_reconcile_says_what_to_do_for_a_vm_an_unknown_migration_left_shut_off() -> None:
    """`escort reconcile` lists earlier UNKNOWN outcomes with where the VM is now. Shut off
    everywhere it is defined (QEMU 7.2 crashed during a failed multifd move): the line names
    the log and the restart; running or paused somewhere: no such advice (reconcile's cases
    or nothing apply)."""
    from console.cli.migrate_cmds import unknown_outcome_line

    e = {"vm": "app-1", "source": "fra-1", "target": "par-1", "ts": "2026-11-28T17:42:19Z"}
    crashed = unknown_outcome_line(e, ["shut off on fra-1"])
    assert "ended UNKNOWN; now: shut off on fra-1 (checked)" in crashed
    assert "virsh start app-1" in crashed and "/var/log/libvirt/qemu/app-1.log" in crashed
    for now in (["running on par-1"], ["paused on fra-1"], ["shut off on fra-1", "running on par-1"], []):
        assert "virsh start" not in unknown_outcome_line(e, now), now
    assert unknown_outcome_line(e, []).endswith("found on no host that answered")


def test_the_confirmation_says_one_stream_or_multifd() -> None:
    """The console's confirmation names how the memory goes over TLS (the default depends on
    the guest's size, so the admin sees which)."""
    from console.ui.screens.migrations import decision_text

    for channels, words in ((1, "one stream to tcp://"), (0, "one stream to tcp://"),
                            (2, "2 connections (multifd) to tcp://")):
        plan = _plan(channels=channels)
        pf = m.Preflight("vm", "u", "hosta", "hostb", "oncall", dt.datetime.now(dt.UTC), (), plan)
        assert words in decision_text(pf), decision_text(pf)
