"""`escort check` offline on the test fleet: placement from the shared decision, expiry with impact."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.cli import main
from console.core.check import impact_sentence, signer_of
from console.services.check import CheckService
from console.services.fleet import FleetService
from tests.unit.trustkit import T0, build_fleet


@pytest.fixture()
def fleet_path(tmp_path: Path) -> Path:
    return build_fleet(tmp_path).fleet


async def test_offline_findings_agree_with_explain(fleet_path: Path) -> None:
    s = FleetService.load(fleet_path, at=T0)
    report = await CheckService(s, days=120, offline=True).run()
    by_code: dict[str, list[dict[str, object]]] = {}
    for f in report.findings:
        by_code.setdefault(f.code, []).append(f.as_json())
    # placement: exactly the VMs whose decision on their current host fails
    expected = set()
    for v in s.vms():
        d = s.explain(v.uuid, v.host)
        if any(r.severity == "error" and r.code not in ("host.current", "host.down") for r in d.reasons):
            expected.add((v.name, v.host))
    got = {(f["vm"], f["host"]) for f in by_code.get("placement.violation", [])}
    assert got == expected
    # hv-de-old's certificate expired before T0: an error, with its impact
    old = [f for f in by_code["expiry.host_cert"] if f["host"] == "hv-de-old"]
    assert old and old[0]["severity"] == "error" and "expired on" in str(old[0]["message"])
    # policies (90 days) and the grant (8 hours) fall inside 120 days, soonest first
    whens = [f.when for f in report.findings if f.when is not None]
    assert whens == sorted(whens)
    assert {"expiry.policy", "expiry.grant"} <= set(by_code)
    policy = by_code["expiry.policy"][0]
    assert "lose" in str(policy["message"]) and str(policy["message"]).count("after ") == 1
    assert not [f for f in report.findings if f.code.startswith(("guard.", "host.unreachable"))]


async def test_horizon(fleet_path: Path) -> None:
    s = FleetService.load(fleet_path, at=T0)
    report = await CheckService(s, days=0, offline=True).run()
    assert not [f for f in report.findings if f.code in ("expiry.policy", "expiry.grant")]
    report = await CheckService(s, days=3650, offline=True).run()
    codes = {f.code for f in report.findings}
    assert {"expiry.owner_cert", "expiry.ca_cert", "expiry.host_cert"} <= codes


def test_cli_exit_codes_and_json(fleet_path: Path) -> None:
    r = CliRunner().invoke(main, ["check", "--fleet", str(fleet_path), "--offline", "--json"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.output)
    assert set(doc) >= {"findings", "checked_at"} and doc["findings"]
    for f in doc["findings"]:
        assert set(f) >= {"code", "severity", "message", "fix"}
    bad = CliRunner().invoke(main, ["check", "--fleet", str(fleet_path.parent / "nope.toml")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_impact_sentence_and_signer() -> None:
    when = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)
    assert impact_sentence(when, 37, 0, 0) == "after 2026-12-06, 37 VMs lose all allowed targets"
    assert impact_sentence(when, 0, 0, 0) == "after 2026-12-06, no VM loses an allowed target"
    assert signer_of("garbage") is None and signer_of("") is None


async def test_half_done_migration_is_a_finding(fleet_path: Path) -> None:
    from console.core.inventory import DomainFacts, HostFacts
    from tests.unit.trustkit import WEB_UUID

    s = FleetService.load(fleet_path, at=T0)
    running = DomainFacts(WEB_UUID, "web-1", "running")
    paused = DomainFacts(WEB_UUID, "web-1", "paused", state_reason="migration")
    s.apply_facts("hv-fr-1", HostFacts("hv-fr-1", 4096, 2, 2048, (running,)), None)
    s.apply_facts("hv-de-1", HostFacts("hv-de-1", 4096, 2, 2048, (paused,)), None)
    report = await CheckService(s, days=0, offline=True).run()
    half = [f for f in report.findings if f.code == "migration.half_done"]
    assert len(half) == 1 and half[0].vm == "web-1" and half[0].severity == "error"
    assert half[0].extra["copies"] and half[0].fix


async def test_a_vm_driven_around_libvirt_is_a_finding(fleet_path: Path) -> None:
    """libvirt's taint marks that mean "driven around libvirt" (a QEMU-to-QEMU migration through
    the monitor is what no guard can stop) are reported; harmless taints are not."""
    from console.core.check import risky_taints
    from console.core.inventory import DomainFacts, HostFacts
    from tests.unit.trustkit import WEB_UUID

    s = FleetService.load(fleet_path, at=T0)
    tainted = DomainFacts(WEB_UUID, "web-1", "running", taints=(
        "tainted: host configuration in use", "tainted: custom monitor control commands issued"))
    s.apply_facts("hv-fr-1", HostFacts("hv-fr-1", 4096, 2, 2048, (tainted,)), None)
    report = await CheckService(s, days=0, offline=True).run()
    found = [f for f in report.findings if f.code == "vm.tainted"]
    assert [(f.vm, f.host, f.severity) for f in found] == [("web-1", "hv-fr-1", "warning")]
    assert found[0].extra["taints"] == ["custom monitor control commands issued"]
    assert "send the VM's memory to any QEMU" in found[0].message and found[0].fix
    assert found[0].as_json()["taints"] == ["custom monitor control commands issued"]
    # harmless marks only: nothing to say
    assert risky_taints(["tainted: host configuration in use",
                         "tainted: use of deprecated configuration settings"]) == []
    s.apply_facts("hv-fr-1", HostFacts("hv-fr-1", 4096, 2, 2048, (
        DomainFacts(WEB_UUID, "web-1", "running", taints=("tainted: host configuration in use",)),)), None)
    report = await CheckService(s, days=0, offline=True).run()
    assert not [f for f in report.findings if f.code == "vm.tainted"]


def test_the_placement_check_in_steps_is_the_placement_check(tmp_path: Path) -> None:
    """The console's stepwise placement check (after its start-up check) finds exactly what the
    one-go check finds, with the same reasons; a step ends once its budget is spent. (The
    seeded demo fleet has VMs on hosts their policies refuse.)"""
    from console.demo import generate
    from console.services.check import misplaced, misplaced_in_steps

    at = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
    demo = generate(tmp_path / "demo", at=at, seed="escort-tests")
    whole = misplaced(FleetService.load(demo, at=at))
    steps = misplaced_in_steps(FleetService.load(demo, at=at), budget_s=0.0)
    pauses = 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            stepped = done.value
            break
    assert whole and stepped == whole
    assert pauses >= len(whole)  # a zero budget: a pause after every full decision
