"""A bypass found by attacking the guard from outside, with PLAIN virsh (no escort code on
the migration path): a policy stripped with ``virsh metadata --remove`` and then
"laundered" by a routine `escort hosts guard install` (whose VM list holds only VMs
that carry a policy now) was admitted on a host the policy refuses, as a VM without a
policy. The guard now also counts escort's pushed memory of policies, so the move is
refused (``guard.policy_stripped``), and `escort check` reports the stripped VM.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.x509.oid import NameOID

from console.core import policy as pol
from console.core.envelope import fingerprint
from tests.integration.test_guard_lab import _escort, _libvirt, _log, _migrate, _running, _virsh

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

VM = "strip-1"


@pytest.fixture(scope="module")
def path_dir(lab_ssh_dir: Path) -> Path:
    """A directory holding an ``ssh`` that uses the lab's ssh_config (conftest.lab_ssh_dir)."""
    return lab_ssh_dir


@pytest.fixture()
def guest(lab: Lab) -> Iterator[str]:
    """A small guest of alice's on fra-1 (no policy yet); gone afterwards."""
    uuid = lab.define_guest("fra-1", VM)
    try:
        yield uuid
    finally:
        libvirt = _libvirt()
        for host in ("fra-1", "fra-2", "par-1"):
            conn = lab.open_libvirt(host)
            try:
                dom = conn.lookupByName(VM)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
            finally:
                conn.close()
        # leave every guard's VM list and memory as the fleet is without this guest
        _escort("hosts", "guard", "install", "--fleet", str(lab.fleet_file), "--json")


def _sign_de_only(lab: Lab, uuid: str) -> str:
    """alice's policy for the guest: the lab root, country DE (fra-1/fra-2 yes, par-1 no)."""
    from console.lab import certs

    pki = certs.load(lab.pki_dir)
    root = pki.root.cert
    cn = str(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    now = dt.datetime.now(dt.UTC)
    payload = pol.build_policy_payload(owner="alice", vm_uuid=uuid, vm_name=VM,
                                       trusted_cas=[(cn, fingerprint(root))], require={"country": ["DE"]},
                                       not_before=now - dt.timedelta(minutes=5),
                                       not_after=now + dt.timedelta(days=1), seq=int(now.timestamp()))
    signer = pki.owners["alice"]
    return pol.sign_policy(payload, signer.key, [signer.cert])


def test_a_laundered_strip_is_refused_and_reported(lab: Lab, path_dir: Path, guest: str) -> None:
    fleet = str(lab.fleet_file)
    uri = "qemu+ssh://fra-1/system"
    token = _sign_de_only(lab, guest)
    put = _virsh(path_dir, "-c", uri, "metadata", VM, pol.POLICY_NS, "--key", "escort", "--set",
                 f'<policy ver="{pol.VERSION}">{token}</policy>', "--live", "--config")
    assert put.returncode == 0, put.stderr
    # the owner's policy is known to escort and to every guard
    first = _escort("hosts", "guard", "install", "--fleet", fleet, "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    # a root admin strips it with plain virsh ...
    strip = _virsh(path_dir, "-c", uri, "metadata", VM, pol.POLICY_NS, "--remove", "--live", "--config")
    assert strip.returncode == 0, strip.stderr
    # ... and someone runs the routine install: the VM list no longer names the guest
    second = _escort("hosts", "guard", "install", "--fleet", fleet, "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    conf_dir = lab.host("par-1").root / "etc/libvirt/escort-guard"
    current = Path((conf_dir / "current").readlink()).name
    conf = json.loads((conf_dir / current / "guard.json").read_text())
    assert guest not in conf["policy_uuids"] and guest in conf["seen"]
    # plain virsh migrate to par-1 (FR), which the stripped policy refuses: refused
    proc = _migrate(lab, path_dir, VM, "fra-1", "par-1")
    assert proc.returncode != 0
    assert f"escort-guard refused {VM}: guard.policy_stripped: " in proc.stderr, proc.stderr
    assert "escort's memory of policies" in proc.stderr
    assert VM in _running(lab, "fra-1") and VM not in _running(lab, "par-1")
    entry = [e for e in _log(lab, "par-1") if e["vm"] == VM][-1]
    assert entry["verdict"] == "refused" and entry["reason"] == "guard.policy_stripped"
    # escort check says so, wherever the stripped VM runs
    check = _escort("check", "--fleet", fleet, "--json")
    findings = [f for f in json.loads(check.stdout)["findings"] if f.get("vm") == VM]
    assert [(f["code"], f["host"], f["reasons"][0]["code"]) for f in findings] == [
        ("placement.violation", "fra-1", "guard.policy_stripped")], findings
    # the owner's policy back on: the guest may move within DE again
    back = _virsh(path_dir, "-c", uri, "metadata", VM, pol.POLICY_NS, "--key", "escort", "--set",
                  f'<policy ver="{pol.VERSION}">{token}</policy>', "--live", "--config")
    assert back.returncode == 0, back.stderr
    ok = _migrate(lab, path_dir, VM, "fra-1", "fra-2")
    assert ok.returncode == 0, ok.stderr
    assert VM in _running(lab, "fra-2")


def test_a_vm_renamed_like_an_option_is_refused(lab: Lab, path_dir: Path, guest: str) -> None:
    """libvirt runs ``escort-guard NAME OP SUBOP -``: a guest renamed ``--dry-run`` on the way
    (``virsh migrate --dname``) or defined as ``--status`` was admitted unchecked before."""
    uri = "qemu+ssh://fra-1/system"
    token = _sign_de_only(lab, guest)
    put = _virsh(path_dir, "-c", uri, "metadata", VM, pol.POLICY_NS, "--key", "escort", "--set",
                 f'<policy ver="{pol.VERSION}">{token}</policy>', "--live", "--config")
    assert put.returncode == 0, put.stderr
    dst = lab.host("par-1").migration_ip
    proc = _virsh(path_dir, "-c", uri, "migrate", "--live", "--tls", "--tls-destination", "par-1", VM,
                  "qemu+ssh://par-1/system", "--migrateuri", f"tcp://{dst}", "--dname=--dry-run")
    assert proc.returncode != 0
    assert "escort-guard refused --dry-run: attr.country: " in proc.stderr, proc.stderr
    assert VM in _running(lab, "fra-1") and "--dry-run" not in _running(lab, "par-1")
    # the same domain defined as `--status` on par-1 and started there
    dump = _virsh(path_dir, "-c", uri, "dumpxml", "--inactive", VM)
    assert dump.returncode == 0, dump.stderr
    libvirt = _libvirt()
    conn = lab.open_libvirt("par-1")
    try:
        dom = conn.defineXML(dump.stdout.replace(f"<name>{VM}</name>", "<name>--status</name>"))
        try:
            with pytest.raises(libvirt.libvirtError, match=r"escort-guard refused --status: attr\.country: "):
                dom.create()
            assert not dom.isActive()
        finally:
            dom.undefine()
    finally:
        conn.close()
    entries = [e for e in _log(lab, "par-1") if e.get("uuid") == guest]
    assert [(e["vm"], e["op"], e["verdict"]) for e in entries[-2:]] == [
        ("--dry-run", "migrate begin", "refused"), ("--status", "prepare begin", "refused")], entries
