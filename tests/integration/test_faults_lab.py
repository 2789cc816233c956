"""Outage drills on the lab (issue 14): faults at three moments of a real migration.

Each scenario (console/lab/drills.py, shared with bench/bench_faults.py) adds a guest
with random-filled RAM (`escort lab guest add`), migrates it fra-1 -> par-1 with a
bandwidth cap, injects the fault with `escort lab fault`'s code when the moment is
*observed* (target QEMU started / a third sent / target runs it), heals, then checks:
the VM is on exactly one host (each host's libvirtd asked directly, and plain `virsh`),
what escort reported matches that truth (moved/stayed only when true; unknown names the
host it could not ask), a leftover copy is offered by reconcile, and `escort audit
verify` passes for the migration's log and the lab's drill log.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from console.cli import main
from console.lab import drills, faults

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab


def _virsh_states(lab: Lab, uuid: str) -> dict[str, str]:
    """host -> `virsh domstate` for every hypervisor that knows the VM (plain virsh)."""
    out: dict[str, str] = {}
    for host in lab.hypervisors:
        proc = subprocess.run(["virsh", "-c", lab.host(host).libvirt_uri, "domstate", uuid],
                              capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode == 0:
            out[host] = proc.stdout.strip()
    return out


def _audit_verify(path: Path) -> None:
    res = CliRunner().invoke(main, ["audit", "verify", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True


@pytest.mark.parametrize("moment", drills.MOMENTS)
@pytest.mark.parametrize("fault", drills.FAULT_MATRIX)
async def test_fault_at_moment(lab: Lab, tmp_path: Path, fault: str, moment: str) -> None:
    name = f"d-{fault.split('-')[-1]}-{moment.split('-')[0]}"
    audit = tmp_path / "audit.log"
    r = await drills.run_drill(lab, fault, moment, fleet_file=lab.fleet_file, audit_path=audit, name=name,
                               log=print)
    detail = json.dumps(r.as_json(), indent=1)
    assert r.fired, f"the moment was not reached: {r.fired_note}\n{detail}"
    assert not r.problems, detail
    assert not r.lost and not r.doubled, detail
    assert r.vm_state in ("moved", "stayed", "unknown")
    if r.vm_state == "unknown":
        # unknown only when a host could not be asked, or the VM runs nowhere (the drill killed it)
        assert any(not h["checked"] for h in r.hosts) or not r.running_on, detail
        assert r.unverified_listed, detail
    # where the VM is, with a tool nobody on the project wrote (the guest is removed by now,
    # so ask about the truth recorded before removal, and check virsh agrees it is gone)
    assert len(r.truth) == 1, detail
    assert _virsh_states(lab, r.uuid) == {}
    entries = [json.loads(line) for line in (lab.dir / "audit.log").read_text().splitlines()]
    drill = [e for e in entries if e.get("kind") == "drill" and e.get("action") == fault]
    assert drill and drill[-1]["host"] == drills.fault_host(fault)
    _audit_verify(audit)
    _audit_verify(lab.dir / "audit.log")


def test_lab_fault_bad_input_one_line_nothing_touched(lab: Lab, tmp_path: Path) -> None:
    log = lab.dir / "audit.log"
    before = log.read_bytes() if log.exists() else b""
    base = ["lab", "fault"]
    where = ["--name", lab.name, "--dir", str(lab.dir)]
    runner = CliRunner()
    res = runner.invoke(main, [*base, "kill-libvirtd", "nope", *where])
    assert res.exit_code == 2 and "no lab host 'nope'" in res.output and len(res.output.splitlines()) == 1
    res = runner.invoke(main, [*base, "kill-libvirtd", "jump", *where])
    assert res.exit_code == 2 and "jump host" in res.output
    res = runner.invoke(main, [*base, "heal-link", "par-1", *where])
    assert res.exit_code == 1 and "not cut" in res.output and len(res.output.splitlines()) == 1
    res = runner.invoke(main, [*base, "restart", "fra-2", *where])
    assert res.exit_code == 1 and "nothing to restart" in res.output
    res = runner.invoke(main, [*base, "kill-libvirtd", "fra-1", "--name", "nolab", "--dir",
                               str(tmp_path / "nolab")])
    assert res.exit_code == 1 and "not up" in res.output and len(res.output.splitlines()) == 1
    assert (log.read_bytes() if log.exists() else b"") == before  # refusals record nothing
    # twice in a row: the second refuses, one line, and the daemon stays down until restart
    res = runner.invoke(main, [*base, "kill-libvirtd", "fra-2", *where, "--json"])
    assert res.exit_code == 0, res.output
    killed = json.loads(res.output)
    assert killed["pids"] and killed["audit_seq"] is not None
    try:
        res = runner.invoke(main, [*base, "kill-libvirtd", "fra-2", *where])
        assert res.exit_code == 1 and "already down" in res.output and len(res.output.splitlines()) == 1
        proc = subprocess.run(["virsh", "-c", lab.host("fra-2").libvirt_uri, "list"], capture_output=True,
                              text=True, timeout=30, check=False)
        assert proc.returncode != 0  # really down
    finally:
        res = runner.invoke(main, [*base, "restart", "fra-2", *where])
        assert res.exit_code == 0, res.output
    proc = subprocess.run(["virsh", "-c", lab.host("fra-2").libvirt_uri, "domstate", "web-2"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout.strip() == "running"  # the guest kept running through its daemon's death
    _audit_verify(log)


def test_lab_guest_add_and_remove(lab: Lab) -> None:
    where = ["--name", lab.name, "--dir", str(lab.dir)]
    runner = CliRunner()
    res = runner.invoke(main, ["lab", "guest", "add", "g-add", "--host", "fra-2", "--memory", "64",
                               "--fill", "32", "--owner", "bob", "--policy", "country=DE", *where, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    try:
        assert _virsh_states(lab, info["uuid"]) == {"fra-2": "running"}
        assert Path(info["grant"]).is_file()
        again = runner.invoke(main, ["lab", "guest", "add", "g-add", "--host", "fra-1", *where])
        assert again.exit_code == 1 and "already exists on fra-2" in again.output
        bad = runner.invoke(main, ["lab", "guest", "add", "g-bad", "--host", "fra-1", "--memory", "64",
                                   "--fill", "60", *where])
        assert bad.exit_code == 2 and "does not fit" in bad.output
        # the owner-signed policy and the grant make it migratable by lab-admin: the one verdict
        res = runner.invoke(main, ["explain", "--fleet", str(lab.fleet_file), "g-add", "fra-1",
                                   "--admin", "lab-admin", "--json"])
        assert json.loads(res.output)["allowed"] is True, res.output
        res = runner.invoke(main, ["explain", "--fleet", str(lab.fleet_file), "g-add", "par-1",
                                   "--admin", "lab-admin", "--json"])
        assert json.loads(res.output)["allowed"] is False  # country=DE: par-1 is in FR
    finally:
        res = runner.invoke(main, ["lab", "guest", "remove", "g-add", *where])
    assert res.exit_code == 0 and "removed from fra-2" in res.output
    assert _virsh_states(lab, info["uuid"]) == {}
    assert not Path(info["grant"]).exists()
    res = runner.invoke(main, ["lab", "guest", "remove", "g-add", *where])
    assert res.exit_code == 2 and len(res.output.splitlines()) == 1
    assert faults.FAULTS  # the CLI and the module share one list of faults


def test_escort_migrate_says_it_in_its_own_words_when_the_jump_host_dies(lab: Lab) -> None:
    """The issue's case: every sshd of the jump host killed while the target prepares.
    libvirt's client used to print "Guest … probably left in 'paused' state on source" on
    the terminal (false: it ran). `escort migrate` now prints nothing on stderr; its JSON
    outcome says both hosts could not be asked and the state is unknown — and the VM,
    asked directly once the jump host is back, runs on exactly one host."""
    import os
    import sys
    import time

    name = "d-cli-jump"
    info = faults.add_guest(lab, name, drills.SOURCE, memory_mib=64, fill_mib=32)
    pid_file = lab.host(drills.TARGET).root / "run" / "libvirt" / "qemu" / f"{name}.pid"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT_")}
    proc = subprocess.Popen([sys.executable, "-m", "console", "migrate", "--fleet", str(lab.fleet_file), name,
                             drills.TARGET, "--admin", "lab-admin", "--yes", "--json", "--bandwidth", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not drills._qemu_started(pid_file):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        faults.inject(lab, "kill-sshd", "jump")
        out, err = proc.communicate(timeout=300)
        assert err == "", err  # nothing from libvirt (or anyone) on the terminal
        outcome = json.loads(out.strip().splitlines()[-1])
        assert outcome["event"] == "outcome" and proc.returncode == 1
        assert outcome["vm_state"] == "unknown" and outcome["result"] == "unknown"
        assert [h["checked"] for h in outcome["hosts"]] == [False, False]
        assert "probably left" not in out and "not running" not in outcome["message"]
    finally:
        if proc.poll() is None:
            proc.kill()
        faults.inject(lab, "restart", "jump")
    for _ in range(150):  # libvirt removes an unfinished incoming copy itself: wait for that
        states = drills.truth(lab, str(info["uuid"]))
        if drills._settled(states):
            break
        time.sleep(0.2)
    assert list(states.values()).count("running") == 1, states
    assert states.get(drills.SOURCE) == "running", states  # it never left, and nobody said otherwise
    faults.remove_guest(lab, name)
