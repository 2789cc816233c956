"""`escort check` on the lab: stray-1's violation and nothing for VMs that are where they may be.

The lab places stray-1 (policy: eu-central CA only) on rogue-1 on purpose; every other
guest runs on a host its owner's policy admits, and every hypervisor runs a current
guard (the lab installs it). An unreachable host is a finding, not a crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab


def _check(lab: Lab, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-m", "console", "check", "--fleet", str(lab.fleet_file), "--json",
                           *args], capture_output=True, text=True, timeout=600, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_check_reports_stray_1_and_nothing_for_correctly_placed_vms(lab: Lab) -> None:
    code, report, err = _check(lab)
    assert code == 1, err
    findings = report["findings"]
    assert report["checked_at"].endswith("Z") and isinstance(findings, list)
    for f in findings:
        assert {"code", "severity", "message", "fix"} <= set(f), f
    violations = [f for f in findings if f["code"] == "placement.violation"]
    assert [(f["vm"], f["host"]) for f in violations] == [("stray-1", "rogue-1")], violations
    codes = {r["code"] for r in violations[0]["reasons"]}
    assert "ca.not_trusted" in codes and "chain.no_issuer" in codes  # every reason, not the first
    about_vms = {f.get("vm") for f in findings if f["code"].startswith(("placement.", "migration."))}
    assert about_vms == {"stray-1"}
    # every hypervisor runs a current guard; nothing is unreachable
    assert not [f for f in findings if f["code"].startswith(("guard.", "host.unreachable"))], findings


def test_check_reports_unreachable_host_and_missing_guard(lab: Lab) -> None:
    from console.services.guard import remote_command

    lab.stop_sshd("fra-2")
    try:
        code, report, err = _check(lab)
    finally:
        lab.start_sshd("fra-2")
    assert code == 1, err
    down = [f for f in report["findings"] if f["code"] == "host.unreachable"]
    assert [f["host"] for f in down] == ["fra-2"], report["findings"]
    # a host whose guard was removed (by hand, as root on the host)
    lab._nsenter_input(lab.host("fra-2"), b"", "sh", "-c", remote_command("remove"))
    try:
        code, report, err = _check(lab)
        missing = [f["host"] for f in report["findings"] if f["code"] == "guard.missing"]
        assert code == 1 and missing == ["fra-2"], report["findings"]
    finally:
        lab.install_guard(["fra-2"])
    code, report, err = _check(lab)
    assert not [f for f in report["findings"] if f["code"].startswith("guard.")], report["findings"]


def test_check_reports_a_vm_driven_through_the_qemu_monitor(lab: Lab) -> None:
    """Plain `virsh qemu-monitor-command` -- the first step of a QEMU-to-QEMU migration that no
    hook or guard sees (docs/GUARD.md) -- leaves libvirt's taint mark on the VM, and `escort
    check` reports it (vm.tainted); before it, nothing is reported for that VM."""
    from console.lab import faults

    name = "taint-1"
    faults.add_guest(lab, name, "fra-1", memory_mib=64, fill_mib=0)
    try:
        _, report, _ = _check(lab)
        assert not [f for f in report["findings"] if f["code"] == "vm.tainted"], report["findings"]
        out = subprocess.run(["virsh", "-c", lab.host("fra-1").libvirt_uri, "qemu-monitor-command", name,
                              "--hmp", "info status"], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0 and "running" in out.stdout, out
        code, report, err = _check(lab)
        assert code == 1, err
        tainted = [f for f in report["findings"] if f["code"] == "vm.tainted"]
        assert [(f["vm"], f["host"], f["severity"]) for f in tainted] == [(name, "fra-1", "warning")], tainted
        assert tainted[0]["taints"] == ["custom monitor control commands issued"]
    finally:
        faults.remove_guest(lab, name)
