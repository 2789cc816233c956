"""InventoryService: concurrent, bounded refresh; each host's problem stays on that host.

Hosts are in-process asyncssh servers (real SSH, real ``head`` reading the certificate)
whose libvirt is a test:/// driver node file, so every path except the libvirt socket
forward runs for real; the forward itself is exercised by the "libvirt down" host here
and by the lab integration tests.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncssh
import pytest

from console.adapters.ssh import SshPool
from console.core.inventory import FleetSpec, HostFacts, HostSpec
from console.core.reasons import Reason
from console.services.inventory import InventoryService, pool_for
from tests.unit import test_ssh_adapter as ssh_fixtures
from tests.unit.test_libvirt_adapter import node_xml
from tests.unit.test_ssh_adapter import FakeHost

# The in-process SSH server fixtures, shared with the SSH adapter's tests.
client_key = ssh_fixtures.client_key
make_host = ssh_fixtures.make_host

CERT = b"-----BEGIN CERTIFICATE-----\n%s\n-----END CERTIFICATE-----\n"


def _spec(tmp_path: Path, name: str, fake: FakeHost | None, *, port: int = 0, **kw: str) -> HostSpec:
    node_dir = tmp_path / name
    node_dir.mkdir(exist_ok=True)
    cert = node_dir / "server-cert.pem"
    cert.write_bytes(CERT % name.encode())
    fields: dict[str, str] = {
        "ssh": fake.addr if fake else f"127.0.0.1:{port}",
        "libvirt_uri": node_xml(node_dir),
        "remote_cert": str(cert),
    }
    fields.update(kw)
    return HostSpec(name=name, **fields)  # type: ignore[arg-type]


def _fleet(tmp_path: Path, key: Path, specs: list[HostSpec], *lines: str) -> FleetSpec:
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(f"{line}\n" for line in lines))
    return FleetSpec(
        name="unit", kind="lab", base_dir=str(tmp_path), trust_dir="t", owners_trust_dir="o",
        known_hosts="known_hosts", identity_files=(str(key),), hosts=tuple(specs),
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, HostFacts | None, Reason | None]] = []

    def __call__(self, name: str, facts: HostFacts | None, problem: Reason | None) -> None:
        self.calls.append((name, facts, problem))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_refresh_reads_facts_and_certificates_concurrently(tmp_path, client_key, make_host):
    fakes = [await make_host() for _ in range(4)]
    specs = [_spec(tmp_path, f"h{i}", f) for i, f in enumerate(fakes)]
    fleet = _fleet(tmp_path, client_key, specs, *(f.known_hosts_line() for f in fakes))
    rec = Recorder()
    inv = InventoryService(fleet, apply=rec)
    try:
        results = await inv.refresh()
        assert set(results) == {"h0", "h1", "h2", "h3"}
        for name, r in results.items():
            assert r.problem is None, r.problem
            assert r.facts is not None
            assert r.facts.cert_pem == CERT % name.encode()
            assert [d.name for d in r.facts.domains] == ["vm-a", "vm-b"]
            assert r.facts.memory_mib == 8192
        assert sorted(c[0] for c in rec.calls) == ["h0", "h1", "h2", "h3"]
        assert inv.max_in_flight == 4  # all at once: none waited for another
        assert inv.pool.connects == 4
        # A second refresh reuses the SSH connections and libvirt handles.
        await inv.refresh()
        assert inv.pool.connects == 4 and all(f.logins == 1 for f in fakes)
    finally:
        await inv.close()


async def test_concurrency_is_bounded(tmp_path, client_key, make_host):
    fakes = [await make_host() for _ in range(6)]
    specs = [_spec(tmp_path, f"h{i}", f) for i, f in enumerate(fakes)]
    fleet = _fleet(tmp_path, client_key, specs, *(f.known_hosts_line() for f in fakes))
    inv = InventoryService(fleet, concurrency=2)
    try:
        results = await inv.refresh()
        assert all(r.problem is None for r in results.values())
        assert inv.max_in_flight == 2
    finally:
        await inv.close()


async def test_each_failure_stays_on_its_host(tmp_path, client_key, make_host):
    good, changed, libvirt_down, no_cert = [await make_host() for _ in range(4)]
    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_public_key())
    no_auth = await make_host(authorized=other_pub)
    wrong = asyncssh.generate_private_key("ssh-ed25519")
    specs = [
        _spec(tmp_path, "good", good),
        _spec(tmp_path, "down", None, port=_closed_port()),
        _spec(tmp_path, "changed", changed),
        _spec(tmp_path, "noauth", no_auth),
        _spec(tmp_path, "novirt", libvirt_down,
              libvirt_uri=f"qemu:///system?socket={tmp_path}/no/libvirt-sock"),
        _spec(tmp_path, "nocert", no_cert, remote_cert=str(tmp_path / "missing.pem")),
    ]
    fleet = _fleet(
        tmp_path, client_key, specs,
        good.known_hosts_line(), changed.known_hosts_line(wrong), no_auth.known_hosts_line(),
        libvirt_down.known_hosts_line(), no_cert.known_hosts_line(),
    )
    rec = Recorder()
    inv = InventoryService(fleet, apply=rec)
    try:
        results = await inv.refresh()
        codes = {n: (r.problem.code if r.problem else None) for n, r in results.items()}
        assert codes == {
            "good": None,
            "down": "host.unreachable",
            "changed": "host.key_changed",
            "noauth": "host.auth_failed",
            "novirt": "host.libvirt_down",
            "nocert": "host.cert_unreadable",
        }
        assert results["good"].facts is not None and results["good"].facts.cert_pem
        # libvirt answered, only the certificate is missing: facts and a problem.
        nocert = results["nocert"]
        assert nocert.facts is not None and nocert.facts.cert_pem == b""
        assert nocert.problem is not None and "missing.pem" in nocert.problem.message
        assert nocert.problem.message.count("nocert:") == 1
        for name in ("down", "changed", "noauth", "novirt"):
            assert results[name].facts is None
            assert results[name].problem is not None
            assert results[name].problem.message.startswith(f"{name}: ")
            assert "\n" not in results[name].problem.message
        assert changed.host_key.get_fingerprint("sha256") in results["changed"].problem.message
        assert libvirt_down.unix_forwards == [f"{tmp_path}/no/libvirt-sock"]
        assert len(rec.calls) == 6
    finally:
        await inv.close()


async def test_a_slow_host_does_not_hold_up_the_others(tmp_path, client_key, make_host):
    async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    silent = await asyncio.start_server(_silent, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    fakes = [await make_host() for _ in range(3)]
    specs = [_spec(tmp_path, "slow", None, port=silent_port)]
    specs += [_spec(tmp_path, f"h{i}", f) for i, f in enumerate(fakes)]
    fleet = _fleet(tmp_path, client_key, specs, *(f.known_hosts_line() for f in fakes))
    pool = pool_for(fleet, connect_timeout=2.0, login_timeout=2.0)
    inv = InventoryService(fleet, pool=pool, concurrency=2)
    try:
        results = await inv.refresh()
        slow = results.pop("slow")
        assert slow.problem is not None and slow.problem.code == "host.timeout"
        assert slow.elapsed_s >= 1.9
        # the silent host held one of the two slots the whole time; the others still
        # finished well before it gave up
        assert all(r.problem is None and r.elapsed_s < slow.elapsed_s for r in results.values())
    finally:
        silent.close()
        await inv.close()


async def test_next_refresh_reconnects_after_a_host_went_down(tmp_path, client_key, make_host):
    fake = await make_host()
    spec = _spec(tmp_path, "h0", fake)
    fleet = _fleet(tmp_path, client_key, [spec], fake.known_hosts_line())
    pool = SshPool(known_hosts=str(tmp_path / "known_hosts"), identity_files=[str(client_key)])
    inv = InventoryService(fleet, pool=pool)
    try:
        assert (await inv.refresh())["h0"].problem is None
        await fake.kill()
        down = (await inv.refresh())["h0"]
        assert down.problem is not None and down.facts is None
        assert down.problem.code == "host.unreachable"
        back = await make_host(port=fake.port, host_key=fake.host_key)
        up = (await inv.refresh())["h0"]
        assert up.problem is None and up.facts is not None
        assert back.logins == 1 and pool.connects == 2
    finally:
        await inv.close()


async def test_local_hosts_without_ssh_use_cert_file(tmp_path):
    cert = tmp_path / "a.pem"
    cert.write_bytes(CERT % b"a")
    (tmp_path / "a").mkdir()
    specs = [
        HostSpec(name="a", libvirt_uri=node_xml(tmp_path / "a"), cert_file="a.pem"),
        HostSpec(name="b", libvirt_uri=node_xml(tmp_path / "a"), cert_file="nope.pem"),
    ]
    fleet = FleetSpec(name="demo", kind="demo", base_dir=str(tmp_path), trust_dir="t",
                      owners_trust_dir="o", hosts=tuple(specs))
    inv = InventoryService(fleet)
    try:
        results = await inv.refresh()
        assert results["a"].problem is None and results["a"].facts is not None
        assert results["a"].facts.cert_pem == cert.read_bytes()
        assert results["b"].problem is not None
        assert results["b"].problem.code == "host.cert_unreadable"
        assert inv._pool is None  # never needed SSH
    finally:
        await inv.close()


async def test_for_fleet_applies_to_the_fleet_service(tmp_path):
    from console.services.fleet import FleetService

    (tmp_path / "a").mkdir()
    spec = HostSpec(name="a", libvirt_uri=node_xml(tmp_path / "a"))
    fleet = FleetSpec(name="demo", kind="demo", base_dir=str(tmp_path), trust_dir="t",
                      owners_trust_dir="o", hosts=(spec,))
    service = FleetService(fleet)
    inv = InventoryService.for_fleet(service)
    try:
        await inv.refresh()
        view = next(v for v in service.hosts() if v.name == "a")
        assert view.reachability == "up" and view.facts is not None
        assert {vm.name for vm in service.vms()} >= {"vm-a", "vm-b"}
    finally:
        await inv.close()
    with pytest.raises(Exception, match="no usable fleet"):
        InventoryService.for_fleet(FleetService(None))


def test_unknown_host_name_and_bad_bound(tmp_path):
    fleet = FleetSpec(name="f", kind="demo", base_dir=str(tmp_path), trust_dir="t",
                      owners_trust_dir="o")
    with pytest.raises(Exception, match="at least 1"):
        InventoryService(fleet, concurrency=0)
    with pytest.raises(Exception, match="no such host"):
        InventoryService(fleet).spec("zz")
