"""The host guard on the lab, tested with PLAIN virsh: no escort code on the migration path.

A root admin who ignores escort runs ``virsh migrate`` between lab hosts through the jump
host (libvirt's qemu+ssh transport runs ``ssh`` from PATH: a wrapper adds the lab's
ssh_config). The destination's libvirtd runs the escort guard hook, which decides with
escort's own core and refuses what the VM's owner-signed policy does not admit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from console.core.policy import POLICY_NS

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def wrapper(lab_ssh_dir: Path) -> Path:
    """A directory holding an ``ssh`` that uses the lab's ssh_config (conftest.lab_ssh_dir)."""
    return lab_ssh_dir


def _virsh(wrapper: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{wrapper}:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LC_ALL": "C"}
    return subprocess.run(["virsh", *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def _migrate(lab: Lab, wrapper: Path, vm: str, src: str, dst: str) -> subprocess.CompletedProcess[str]:
    return _virsh(wrapper, "-c", f"qemu+ssh://{src}/system", "migrate", "--live", "--tls",
                  "--tls-destination", dst, "--persistent", "--undefinesource", vm,
                  f"qemu+ssh://{dst}/system", "--migrateuri", f"tcp://{lab.host(dst).migration_ip}")


def _libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    return libvirt


def _running(lab: Lab, host: str) -> list[str]:
    libvirt = _libvirt()
    conn = lab.open_libvirt(host)
    try:
        return sorted(d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    finally:
        conn.close()


def _log(lab: Lab, host: str) -> list[dict[str, Any]]:
    path = lab.host(host).root / "var" / "log" / "libvirt" / "escort-guard.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _escort(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_virsh_bypass_refused_by_the_destination_guard(lab: Lab, wrapper: Path) -> None:
    assert "db-1" in _running(lab, "fra-1")
    before = len(_log(lab, "par-1"))
    proc = _migrate(lab, wrapper, "db-1", "fra-1", "par-1")
    assert proc.returncode != 0
    # virsh's error ends with the guard's one line, naming the reason code
    assert "escort-guard refused db-1: ca.not_trusted: " in proc.stderr, proc.stderr
    assert "attr.policy" in proc.stderr
    assert "db-1" in _running(lab, "fra-1") and "db-1" not in _running(lab, "par-1")
    new = _log(lab, "par-1")[before:]
    refused = [e for e in new if e["vm"] == "db-1" and e["verdict"] == "refused"]
    assert refused, new
    assert refused[0]["reason"] == "ca.not_trusted" and refused[0]["op"] == "migrate begin"
    assert len(refused[0]["uuid"]) == 36 and len(refused[0]["policy_digest"]) == 64


def _app1_home(lab: Lab) -> tuple[str, str]:
    """(where app-1 runs, the other host its policy admits): par-1/fra-1 in a fresh lab."""
    home = "par-1" if "app-1" in _running(lab, "par-1") else "fra-1"
    assert "app-1" in _running(lab, home)
    return home, ("fra-1" if home == "par-1" else "par-1")


def test_allowed_move_succeeds_and_moves_back(lab: Lab, wrapper: Path) -> None:
    home, away = _app1_home(lab)
    proc = _migrate(lab, wrapper, "app-1", home, away)
    assert proc.returncode == 0, proc.stderr
    assert "app-1" in _running(lab, away) and "app-1" not in _running(lab, home)
    admitted = [e for e in _log(lab, away) if e["vm"] == "app-1" and e["op"] == "migrate begin"]
    assert admitted and admitted[-1]["verdict"] == "admitted"
    back = _migrate(lab, wrapper, "app-1", away, home)
    assert back.returncode == 0, back.stderr
    assert "app-1" in _running(lab, home)


def test_stripped_policy_is_refused(lab: Lab, wrapper: Path) -> None:
    """web-2 may go fra-2 -> fra-1; with its policy removed from the XML it may not."""
    libvirt = _libvirt()
    conn = lab.open_libvirt("fra-2")
    try:
        dom = conn.lookupByName("web-2")
        token = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, POLICY_NS)
    finally:
        conn.close()
    strip = _virsh(wrapper, "-c", "qemu+ssh://fra-2/system", "metadata", "web-2", POLICY_NS,
                   "--remove", "--live", "--config")
    assert strip.returncode == 0, strip.stderr
    try:
        proc = _migrate(lab, wrapper, "web-2", "fra-2", "fra-1")
        assert proc.returncode != 0
        assert "escort-guard refused web-2: guard.policy_stripped: " in proc.stderr, proc.stderr
        assert "web-2" in _running(lab, "fra-2") and "web-2" not in _running(lab, "fra-1")
    finally:
        put = _virsh(wrapper, "-c", "qemu+ssh://fra-2/system", "metadata", "web-2", POLICY_NS,
                     "--key", "escort", "--set", token, "--live", "--config")
        assert put.returncode == 0, put.stderr


def test_guard_cli_status_remove_install(lab: Lab) -> None:
    fleet = str(lab.fleet_file)
    # other tests define VMs with policies: bring every guard's VM list up to date first
    first = _escort("hosts", "guard", "install", "--fleet", fleet, "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    st = _escort("hosts", "guard", "status", "--fleet", fleet, "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    rows = {r["host"]: r for r in json.loads(st.stdout)["hosts"]}
    assert set(rows) == set(lab.hypervisors)
    assert all(r["state"] == "current" and r["trust_digest"] == r["expected_digest"] for r in rows.values())
    gone = _escort("hosts", "guard", "remove", "--fleet", fleet, "fra-2")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    st = _escort("hosts", "guard", "status", "--fleet", fleet)
    assert st.returncode == 1
    assert any(line.split()[1:3] == ["fra-2", "missing"] for line in st.stdout.splitlines()), st.stdout
    again = _escort("hosts", "guard", "install", "--fleet", fleet, "fra-2", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    (row,) = json.loads(again.stdout)["hosts"]
    assert row["ok"] and "code" in row["steps"] and "hook" in row["steps"]
    # idempotent: a second install pushes no code and leaves libvirtd alone
    twice = _escort("hosts", "guard", "install", "--fleet", fleet, "fra-2", "--json")
    (row,) = json.loads(twice.stdout)["hosts"]
    assert row["ok"] and row["steps"] == ["trust material"] and row["restart"] == ""
    st = _escort("hosts", "guard", "status", "--fleet", fleet, "--json")
    assert st.returncode == 0, st.stdout
    assert "web-2" in _running(lab, "fra-2")


def test_escort_migration_through_the_guard_and_a_guard_refusal(lab: Lab) -> None:
    """escort's own migration passes the guard; when the guard refuses, escort shows its reason."""
    fleet = str(lab.fleet_file)
    home, away = _app1_home(lab)
    before = len(_log(lab, away))
    ok = _escort("migrate", "--fleet", fleet, "app-1", away, "--admin", "lab-admin", "--yes", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "app-1" in _running(lab, away)
    assert any(e["vm"] == "app-1" and e["verdict"] == "admitted" for e in _log(lab, away)[before:])
    # a guard that cannot read its trust material refuses (fail closed): break home's
    current = lab.host(home).root / "etc" / "libvirt" / "escort-guard" / "current"
    target = current.readlink()
    current.unlink()
    try:
        back = _escort("migrate", "--fleet", fleet, "app-1", home, "--admin", "lab-admin", "--yes", "--json")
        assert back.returncode == 1, back.stdout + back.stderr
        lines = [json.loads(x) for x in back.stdout.splitlines() if x.startswith("{")]
        outcome = next(x for x in lines if x.get("event") == "outcome")
        text = json.dumps(outcome)
        assert "guard.refused" in text and "guard.trust_unusable" in text, text
        assert "app-1" in _running(lab, away) and "app-1" not in _running(lab, home)
    finally:
        current.symlink_to(target)
    again = _escort("migrate", "--fleet", fleet, "app-1", home, "--admin", "lab-admin", "--yes", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "app-1" in _running(lab, home)


def _pki(lab: Lab) -> Any:
    from console.lab import certs

    return lab.pki or certs.load(lab.pki_dir)


def test_start_and_restore_are_guarded_too(lab: Lab, wrapper: Path, tmp_path: Path) -> None:
    """`virsh start` of a VM its policy refuses here, and `virsh restore` of a saved VM on a
    host its policy refuses: both refused by the hook (prepare begin / restore begin)."""
    import uuid as uuidlib

    from console.lab import guests
    from console.lab.hosts import GuestPlan, hypervisor

    libvirt = _libvirt()
    # a VM whose owner trusts only eu-central, defined (not started) on par-1 (eu-west)
    vm_uuid = str(uuidlib.uuid4())
    plan = GuestPlan("gd-start", "bob", trust=("eu-central",))
    meta = guests.policy_metadata(_pki(lab), hypervisor("par-1"), plan, vm_uuid)
    conn = lab.open_libvirt("par-1")
    try:
        guests.define_guest(conn, "gd-start", uuid=vm_uuid, metadata_xml=meta, start=False)
    finally:
        conn.close()
    try:
        start = _virsh(wrapper, "-c", "qemu+ssh://par-1/system", "start", "gd-start")
        assert start.returncode != 0
        assert "escort-guard refused gd-start: ca.not_trusted: " in start.stderr, start.stderr
        assert "gd-start" not in _running(lab, "par-1")
        entry = [e for e in _log(lab, "par-1") if e["vm"] == "gd-start"][-1]
        assert entry["op"] == "prepare begin" and entry["verdict"] == "refused"
    finally:
        conn = lab.open_libvirt("par-1")
        try:
            conn.lookupByName("gd-start").undefine()
        finally:
            conn.close()
    # save a guest on fra-1 (policy: the lab root) and restore it on rogue-1, then on fra-1
    lab.define_guest("fra-1", "gd-save", owner="alice")
    saved = tmp_path / "gd-save.img"
    try:
        save = _virsh(wrapper, "-c", "qemu+ssh://fra-1/system", "save", "gd-save", str(saved))
        assert save.returncode == 0, save.stderr
        on_rogue = _virsh(wrapper, "-c", "qemu+ssh://rogue-1/system", "restore", str(saved))
        assert on_rogue.returncode != 0
        assert "escort-guard refused gd-save: " in on_rogue.stderr, on_rogue.stderr
        assert "gd-save" not in _running(lab, "rogue-1")
        assert [e for e in _log(lab, "rogue-1") if e["vm"] == "gd-save"][-1]["op"] == "restore begin"
        home = _virsh(wrapper, "-c", "qemu+ssh://fra-1/system", "restore", str(saved))
        assert home.returncode == 0, home.stderr
        assert "gd-save" in _running(lab, "fra-1")
    finally:
        conn = lab.open_libvirt("fra-1")
        try:
            dom = conn.lookupByName("gd-save")
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
