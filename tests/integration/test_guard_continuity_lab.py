"""The host guard refuses a rolled-back policy and an owner swap — tested with PLAIN virsh.

A root admin bypasses escort: they attach an older (still valid, owner-signed) policy,
or one signed by another trusted owner without a hand-over, to a running domain with
``virsh metadata`` and move it with ``virsh migrate``. The destination's guard knows
the newest policy escort has seen (pushed by `escort hosts guard install`) and what it
admitted itself, and refuses with escort's own codes. Its own memory is tested with
``virsh start`` after the persistent config was rolled back on the host itself.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
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

VM = "cont-1"
MEMORY = Path("var/lib/libvirt/escort-guard-state/seen.json")


@pytest.fixture(scope="module")
def path_dir(lab_ssh_dir: Path) -> Path:
    """A directory holding an ``ssh`` that uses the lab's ssh_config (conftest.lab_ssh_dir)."""
    return lab_ssh_dir


@pytest.fixture()
def guest(lab: Lab) -> Iterator[str]:
    """A small guest of alice's on par-1 (policy trusting the lab root); gone afterwards."""
    uuid = lab.define_guest("par-1", VM, owner="alice")
    try:
        yield uuid
    finally:
        libvirt = _libvirt()
        for host in ("par-1", "fra-1"):
            conn = lab.open_libvirt(host)
            try:
                dom = conn.lookupByName(VM)
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
            except libvirt.libvirtError:
                pass
            finally:
                conn.close()


def _sign(lab: Lab, owner: str, uuid: str, seq: int) -> str:
    """An owner-signed policy for the guest, valid for a day, with the given ``seq``."""
    from console.lab import certs

    pki = certs.load(lab.pki_dir)
    root = pki.root.cert
    cn = str(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    now = dt.datetime.now(dt.UTC)
    payload = pol.build_policy_payload(owner=owner, vm_uuid=uuid, vm_name=VM,
                                       trusted_cas=[(cn, fingerprint(root))], require={},
                                       not_before=now - dt.timedelta(minutes=5),
                                       not_after=now + dt.timedelta(days=1), seq=seq)
    signer = pki.owners[owner]
    return pol.sign_policy(payload, signer.key, [signer.cert])


def _attach(path_dir: Path, host: str, token: str, *where: str) -> None:
    """``virsh metadata --set``: virsh puts the element into the namespace given by --key."""
    proc = _virsh(path_dir, "-c", f"qemu+ssh://{host}/system", "metadata", VM, pol.POLICY_NS,
                  "--key", "escort", "--set", f'<policy ver="{pol.VERSION}">{token}</policy>',
                  *(where or ("--live", "--config")))
    assert proc.returncode == 0, proc.stderr


def _still_valid(lab: Lab, token: str, uuid: str) -> None:
    """The token is a good policy on its own (no memory): only continuity can refuse it."""
    from console.services.fleet import FleetService

    owners = FleetService.load(lab.fleet_file).owners
    result = pol.PolicyBook(owners).verify(token, dt.datetime.now(dt.UTC), vm_uuid=uuid)
    assert result.valid, result.reasons


def test_virsh_rollback_and_owner_swap_refused_by_the_guard(lab: Lab, path_dir: Path, guest: str) -> None:
    base = int(time.time())
    new = _sign(lab, "alice", guest, base + 1000)
    old = _sign(lab, "alice", guest, base + 500)  # older than `new`, newer than the first one
    bobs = _sign(lab, "bob", guest, base + 2000)  # another trusted owner, no hand-over
    _attach(path_dir, "par-1", new)
    # escort sees the newest policy (refresh) and pushes what it has seen to every guard
    inst = _escort("hosts", "guard", "install", "--fleet", str(lab.fleet_file), "--json", "par-1", "fra-1")
    assert inst.returncode == 0, inst.stdout + inst.stderr
    conf_dir = lab.host("fra-1").root / "etc/libvirt/escort-guard"
    current = Path(os.readlink(conf_dir / "current")).name  # an absolute link inside the host's mounts
    conf = json.loads((conf_dir / current / "guard.json").read_text())
    assert conf["seen"][guest]["seq"] == base + 1000
    assert "alice" in conf["seen"][guest]["owner_label"]

    # 1. an older, still valid policy of alice's: refused on the destination
    _still_valid(lab, old, guest)
    _attach(path_dir, "par-1", old)
    proc = _migrate(lab, path_dir, VM, "par-1", "fra-1")
    assert proc.returncode != 0
    assert f"escort-guard refused {VM}: policy.rollback: " in proc.stderr, proc.stderr
    assert VM in _running(lab, "par-1") and VM not in _running(lab, "fra-1")

    # 2. bob's policy (same owners' CA) without alice's hand-over: refused
    _still_valid(lab, bobs, guest)
    _attach(path_dir, "par-1", bobs)
    proc = _migrate(lab, path_dir, VM, "par-1", "fra-1")
    assert proc.returncode != 0
    assert f"escort-guard refused {VM}: policy.owner_changed: " in proc.stderr, proc.stderr
    assert VM in _running(lab, "par-1") and VM not in _running(lab, "fra-1")
    refused = [e for e in _log(lab, "fra-1") if e["vm"] == VM and e["verdict"] == "refused"]
    assert [e["reason"] for e in refused] == ["policy.rollback", "policy.owner_changed"]

    # 3. the newest policy: the same plain virsh move passes
    _attach(path_dir, "par-1", new)
    proc = _migrate(lab, path_dir, VM, "par-1", "fra-1")
    assert proc.returncode == 0, proc.stderr
    assert VM in _running(lab, "fra-1") and VM not in _running(lab, "par-1")

    # 4. the guard's own memory: par-1 admits an even newer policy escort never saw ...
    newer = _sign(lab, "alice", guest, base + 1500)
    _attach(path_dir, "fra-1", newer)
    proc = _migrate(lab, path_dir, VM, "fra-1", "par-1")
    assert proc.returncode == 0, proc.stderr
    memory = json.loads((lab.host("par-1").root / MEMORY).read_text())
    assert memory["vms"][guest]["seq"] == base + 1500
    # ... so rolling par-1's own config back to `new` (all escort has seen) and starting it is refused
    stop = _virsh(path_dir, "-c", "qemu+ssh://par-1/system", "destroy", VM)
    assert stop.returncode == 0, stop.stderr
    _attach(path_dir, "par-1", new, "--config")
    start = _virsh(path_dir, "-c", "qemu+ssh://par-1/system", "start", VM)
    assert start.returncode != 0
    assert f"escort-guard refused {VM}: policy.rollback: " in start.stderr, start.stderr
    assert VM not in _running(lab, "par-1")
    _attach(path_dir, "par-1", newer, "--config")
    again = _virsh(path_dir, "-c", "qemu+ssh://par-1/system", "start", VM)
    assert again.returncode == 0, again.stderr
    assert VM in _running(lab, "par-1")
