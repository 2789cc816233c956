"""Inventory against the lab: real OpenSSH sshd, real libvirtd, real QEMU, a real jump host.

Every test leaves the lab as it found it (daemons restarted, host keys restored) in a
``finally``; each builds its own SSH pool, so no connection outlives a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography import x509

from console.adapters.fleetfile import load_fleet
from console.adapters.ssh import HostKeyProblem, SshPool
from console.core.inventory import FleetSpec
from console.services.fleet import FleetService
from console.services.inventory import InventoryService, pool_for

pytestmark = pytest.mark.lab

ROGUE = "rogue-1"
JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@pytest.fixture
def fleet(lab: Any) -> FleetSpec:
    return load_fleet(lab.fleet_file)


@pytest.fixture
async def inventory(fleet: FleetSpec) -> AsyncIterator[InventoryService]:
    inv = InventoryService(fleet, pool=pool_for(fleet, connect_timeout=5.0, login_timeout=5.0))
    yield inv
    await inv.close()


def _ok(results: dict[str, Any], *names: str) -> None:
    for name in names:
        r = results[name]
        assert r.problem is None, f"{name}: {r.problem}"
        assert r.facts is not None and r.facts.domains and r.facts.cert_pem


async def _wait_sshd(lab: Any, fleet: FleetSpec, host: str, timeout: float = 10.0) -> None:
    """After a restart: until the host answers SSH through the jump host again."""
    spec = next(h for h in fleet.hosts if h.name == host)
    deadline = time.monotonic() + timeout
    while True:
        pool = pool_for(fleet, connect_timeout=2.0)
        try:
            await pool.run(spec.ssh, "true", jump=spec.jump, name=host)
            return
        except HostKeyProblem:
            return  # it answers (a key problem is the caller's business)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await pool.close()


async def test_inventory_through_the_jump_host(lab: Any, fleet: FleetSpec, inventory: InventoryService):
    assert all(h.jump for h in fleet.hosts)  # the lab's hypervisors are behind the jump host
    results = await inventory.refresh()
    assert set(results) == set(lab.hypervisors)
    _ok(results, *lab.hypervisors)
    # One jump connection carries all four hosts.
    assert inventory.pool.connects == len(lab.hypervisors) + 1
    for name in lab.hypervisors:
        facts = results[name].facts
        assert facts.hostname == name  # libvirt on *that* host answered (UTS namespace)
        assert facts.memory_mib > 0 and facts.cpus > 0
        planned = {g.name for g in lab.host(name).plan.guests}
        assert planned <= {d.name for d in facts.domains}
        for dom in facts.domains:
            if dom.name in planned:
                assert dom.state == "running"
                assert JWS.fullmatch(dom.policy_token), dom.policy_token  # decoded, not XML
                assert "<policy" in dom.policy_xml
    # libvirt came through our SSH connection: a forwarded socket in a private dir.
    for name in lab.hypervisors:
        handle = inventory.libvirt_cached(name)
        assert handle is not None
        sock = Path(handle.local_uri.split("socket=", 1)[1])
        assert sock.parent.name.startswith("escort-libvirt-")
        assert sock.parent.stat().st_mode & 0o777 == 0o700
        assert await handle.call(handle.conn.getHostname) == name
    # A second refresh reuses every connection.
    again = await inventory.refresh()
    _ok(again, *lab.hypervisors)
    assert inventory.pool.connects == len(lab.hypervisors) + 1


async def test_rogue_host_certificate_read_and_refused(
    lab: Any, fleet: FleetSpec, inventory: InventoryService
):
    results = await inventory.refresh([ROGUE, "fra-1"])
    _ok(results, ROGUE, "fra-1")
    # The bytes came over SSH from the host: the certificate QEMU presents.
    remote = x509.load_pem_x509_certificate(results[ROGUE].facts.cert_pem)
    on_disk = x509.load_pem_x509_certificates((lab.host(ROGUE).pki_dir / "server-cert.pem").read_bytes())
    assert remote == on_disk[0]
    # Applied to the fleet, the rogue host's chain is refused with a reason; fra-1's is not.
    service = FleetService(fleet)
    for name, r in results.items():
        service.apply_facts(name, r.facts, r.problem)
    views = {v.name: v for v in service.hosts()}
    assert views[ROGUE].reachability == "up"
    assert views[ROGUE].chain is not None and not views[ROGUE].chain.valid
    assert views[ROGUE].chain.reasons
    assert views["fra-1"].chain is not None and views["fra-1"].chain.valid


async def test_host_with_sshd_stopped_is_unreachable_others_refresh(
    lab: Any, fleet: FleetSpec, inventory: InventoryService
):
    victim = "fra-2"
    lab.stop_sshd(victim)
    try:
        results = await inventory.refresh()
        r = results[victim]
        assert r.facts is None and r.problem is not None
        assert r.problem.code == "host.unreachable", r.problem
        assert r.problem.message.startswith(f"{victim}: unreachable")
        _ok(results, *(h for h in lab.hypervisors if h != victim))
    finally:
        lab.start_sshd(victim)
        await _wait_sshd(lab, fleet, victim)
    # Reconnects on the next refresh once sshd is back.
    _ok(await inventory.refresh([victim]), victim)


async def test_changed_host_key_refused(lab: Any, fleet: FleetSpec, inventory: InventoryService):
    victim = "par-1"
    key_file = lab.host(victim).root / "etc" / "ssh" / "ssh_host_ed25519_key"
    backup = key_file.with_name("escort-test-key.bak")
    shutil.copy2(key_file, backup)
    new_key = asyncssh.generate_private_key("ssh-ed25519")
    try:
        new_key.write_private_key(key_file)
        key_file.chmod(0o600)
        lab.stop_sshd(victim)
        lab.start_sshd(victim)
        await _wait_sshd(lab, fleet, victim)
        results = await inventory.refresh()
        r = results[victim]
        assert r.facts is None and r.problem is not None
        assert r.problem.code == "host.key_changed", r.problem
        assert new_key.get_fingerprint("sha256") in r.problem.message
        assert str(fleet.known_hosts) in r.problem.message or "known_hosts" in r.problem.message
        _ok(results, *(h for h in lab.hypervisors if h != victim))
    finally:
        shutil.copy2(backup, key_file)
        backup.unlink()
        lab.stop_sshd(victim)
        lab.start_sshd(victim)
        await _wait_sshd(lab, fleet, victim)
    _ok(await inventory.refresh([victim]), victim)


async def test_libvirt_stopped_shows_libvirt_down_on_that_host_only(
    lab: Any, fleet: FleetSpec, inventory: InventoryService
):
    victim = "fra-1"
    _ok(await inventory.refresh([victim]), victim)  # hold an open libvirt handle first
    lab.stop_libvirtd(victim)
    try:
        results = await inventory.refresh()
        r = results[victim]
        assert r.facts is None and r.problem is not None
        assert r.problem.code == "host.libvirt_down", r.problem
        assert r.problem.message.startswith(f"{victim}: libvirt down")
        _ok(results, *(h for h in lab.hypervisors if h != victim))
        # SSH to the host still works: the problem is libvirt's, not the host's.
        spec = next(h for h in fleet.hosts if h.name == victim)
        assert await inventory.pool.read_file(spec.ssh, spec.remote_cert, jump=spec.jump)
    finally:
        lab.start_libvirtd(victim)
    _ok(await inventory.refresh([victim]), victim)


async def test_unknown_host_key_refused_with_empty_known_hosts(
    lab: Any, fleet: FleetSpec, tmp_path: Path
):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    pool = SshPool(known_hosts=str(empty), identity_files=list(fleet.identity_files))
    spec = fleet.hosts[0]
    try:
        with pytest.raises(HostKeyProblem) as err:
            await pool.connect(spec.ssh, spec.jump, name=spec.name)
        assert err.value.code == "host.jump_failed"  # the jump host is the first unknown key
        assert "host key unknown" in str(err.value)
    finally:
        with contextlib.suppress(Exception):
            await pool.close()


async def test_ssh_config_alias_with_proxyjump_reaches_a_host(lab: Any):
    """Only what ~/.ssh/config-style files say: alias, User, IdentityFile, ProxyJump."""
    pool = SshPool(known_hosts=str(lab.known_hosts), config=str(lab.ssh_config))
    try:
        assert pool.jump_chain("par-1")  # the config routes it through the jump host
        assert await pool.run("par-1", "hostname") == b"par-1\n"
        assert await pool.run("fra-2", "hostname") == b"fra-2\n"
        assert pool.connects == 3  # one jump connection shared by both hosts
    finally:
        await pool.close()
