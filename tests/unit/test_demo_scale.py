"""``escort demo --vms N --hosts M``: a generated offline fleet that loads and decides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.adapters.fleetfile import load_fleet
from console.cli import main
from console.demo_scale import generate_scale
from console.services.fleet import FleetService


def test_scale_fleet_loads_and_every_vm_has_a_verdict(tmp_path: Path) -> None:
    fleet = generate_scale(tmp_path / "scale", vms=40, hosts=12, owners=3, rules=5)
    spec = load_fleet(fleet)
    assert len(spec.vms) == 40 and len(spec.hosts) == 12
    assert all(not h.ssh for h in spec.hosts)  # offline: nothing to contact
    service = FleetService.load_strict(fleet, eager=True)
    matrix = service.matrix()
    assert set(matrix.targets) == {v.uuid for v in spec.vms}
    # the fleet has refusals to explain: the rogue CA (host 96 would need 97 hosts), expired
    # and mismatched hosts; at 12 hosts at least attribute and CA refusals exist
    codes = {r.code for d in service.targets(spec.vms[0].name) for r in d.reasons}
    assert codes, "every host allowed: the generated fleet explains nothing"
    # and most policies are valid under escort's current owner rules (EKU, owners' CRL...)
    valid = [v for v in service.vms() if not v.policy_problems]
    assert len(valid) >= 0.9 * len(spec.vms), {r.code for v in service.vms() for r in v.policy_problems}
    assert any(v.allowed_targets for v in valid)
    assert len(matrix.at_home) >= 0.5 * len(spec.vms)  # most VMs run where their policy admits them


def test_demo_cli_print_path_generates_once(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["demo", "--vms", "20", "--hosts", "5", "--dir", str(tmp_path / "s"), "--print-path"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    fleet = Path(first.stdout.strip().splitlines()[-1])
    assert fleet.is_file()
    stamp = json.loads((fleet.parent / "scale.json").read_text())
    assert (stamp["vms"], stamp["hosts"]) == (20, 5)
    before = fleet.stat().st_mtime_ns
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and fleet.stat().st_mtime_ns == before  # reused, not regenerated
    out = runner.invoke(main, ["explain", "--offline", "--fleet", str(fleet), "--json",
                               load_fleet(fleet).vms[0].name, "hv-0001"])
    assert out.exit_code in (0, 1), out.output
    assert json.loads(out.stdout)["host"] == "hv-0001"


def test_demo_cli_refuses_sizes_out_of_range(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["demo", "--vms", "10", "--hosts", "0", "--dir", str(tmp_path)])
    assert out.exit_code == 2


def test_a_big_demo_splits_its_vms_over_vm_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past VMS_PER_FILE VMs (10,000; lowered here) the generated fleet keeps each file
    under the fleet-file bound: VMs go to vms/*.toml, named by vm_files."""
    from console import demo_scale

    monkeypatch.setattr(demo_scale, "VMS_PER_FILE", 15)
    fleet = generate_scale(tmp_path / "scale", vms=40, hosts=6, owners=2, rules=3)
    assert sorted(p.name for p in (fleet.parent / "vms").iterdir()) == ["000.toml", "001.toml", "002.toml"]
    spec = load_fleet(fleet)
    assert len(spec.vms) == 40
    assert all(Path(v.policy_file).is_file() for v in spec.vms if v.policy_file)
    assert sum(1 for v in spec.vms if v.policy_file) >= 39
