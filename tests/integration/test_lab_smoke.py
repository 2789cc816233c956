"""The lab is what the other integration tests assume: real sshd behind a jump host,
real libvirtd per host, running guests with signed policies, a rogue certificate,
no way out of the machine, and a real TLS live migration between two hosts.

Every test leaves the lab as it found it (the ``lab`` fixture is shared by the whole
session).
"""

from __future__ import annotations

import datetime as dt
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

if TYPE_CHECKING:
    from console.lab import Lab

ROGUE = "rogue-1"


def _ssh(lab: Lab, host: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(lab.ssh_config), host, command], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _libvirt() -> Any:
    import libvirt

    return libvirt


@pytest.mark.lab
def test_lab_up_is_idempotent(lab: Lab) -> None:
    again = lab.up()
    assert again.already is True  # nothing rebuilt: the running lab is reported as it is
    assert lab.is_up()


@pytest.mark.lab
def test_every_sshd_answers_through_the_jump_host(lab: Lab) -> None:
    hosts = [lab.jump.name, *lab.hypervisors]
    aliases = [f"{lab.name}-jump", *lab.hypervisors]
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        results = list(pool.map(lambda alias: _ssh(lab, alias, "hostname"), aliases))
    for host, out in zip(hosts, results, strict=True):
        assert out.returncode == 0, f"{host}: {out.stderr.strip()}"
        assert out.stdout.strip() == host
    # The jump host's key is pinned in known_hosts: a hypervisor reached under a name
    # that is not in known_hosts is refused (StrictHostKeyChecking yes).
    ip = lab.host("fra-1").ssh_ip
    refused = subprocess.run(
        ["ssh", "-F", str(lab.ssh_config), "-o", "HostKeyAlias=not-in-known-hosts", ip, "true"],
        capture_output=True, text=True, timeout=20, check=False)
    assert refused.returncode != 0
    assert "verification failed" in refused.stderr or "No ED25519 host key" in refused.stderr


@pytest.mark.lab
def test_hypervisors_are_not_reachable_without_the_jump_host(lab: Lab) -> None:
    # The root namespace has an "unreachable" route for the lab ranges: packets for
    # the back network must never go to the machine's default gateway.
    from console.lab import netns

    blocked = netns.ip("route", "show", "type", "unreachable").stdout
    assert "198.18.0.0/15" in blocked
    for host in lab.hypervisors:
        with pytest.raises(OSError):
            socket.create_connection((lab.host(host).ssh_ip, 22), timeout=2).close()


@pytest.mark.lab
def test_every_libvirtd_answers_on_its_own_socket(lab: Lab) -> None:
    libvirt = _libvirt()
    for host in lab.hypervisors:
        conn = libvirt.open(f"qemu+unix:///system?socket={lab.host(host).root}/run/libvirt/libvirt-sock")
        try:
            assert conn.getHostname() == host  # its own UTS namespace
            assert conn.getLibVersion() >= 9_000_000
        finally:
            conn.close()
    # Distinct host UUIDs (else libvirt refuses migration as "same host") are proven
    # by the migration test below.


@pytest.mark.lab
def test_guests_run_with_owner_signed_policies(lab: Lab) -> None:
    from console.adapters.files import load_trust_store
    from console.core.policy import POLICY_NS, verify_policy

    libvirt = _libvirt()
    now = dt.datetime.now(dt.UTC)
    owners, problems = load_trust_store(lab.pki_dir / "owners-trust", now)
    assert not problems
    for host in lab.hypervisors:
        plan = lab.host(host).plan
        assert plan is not None
        conn = lab.open_libvirt(host)
        try:
            running = {d.name(): d for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
            for guest in plan.guests:
                assert guest.name in running, f"{guest.name} not running on {host}"
                dom = running[guest.name]
                meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, POLICY_NS)
                token = meta.split(">", 1)[1].rsplit("<", 1)[0].strip()
                result = verify_policy(token, owners, now, vm_uuid=dom.UUIDString())
                assert result.valid, [r.code for r in result.reasons]
                assert result.policy is not None and result.policy.owner == guest.owner
        finally:
            conn.close()


@pytest.mark.lab
def test_rogue_certificate_does_not_chain_to_the_tree(lab: Lab) -> None:
    """Checked with cryptography's own verifier, independently of escort's pki code."""
    trust = lab.pki_dir / "trust"
    root = x509.load_pem_x509_certificate((trust / "root-ca.pem").read_bytes())
    intermediates = [x509.load_pem_x509_certificate((trust / f"{r}-ca.pem").read_bytes())
                     for r in ("eu-central", "eu-west")]
    for host in lab.hypervisors:
        # The certificate QEMU presents, read from inside the host's private /etc/pki.
        leaf = x509.load_pem_x509_certificate((lab.host(host).pki_dir / "server-cert.pem").read_bytes())
        verifier = (PolicyBuilder().store(Store([root])).time(dt.datetime.now(dt.UTC))
                    .build_server_verifier(x509.DNSName(host)))
        if host == ROGUE:
            with pytest.raises(VerificationError):
                verifier.verify(leaf, intermediates)
        else:
            chain = verifier.verify(leaf, intermediates)
            assert chain[-1] == root


@pytest.mark.lab
def test_no_route_out_of_the_lab(lab: Lab) -> None:
    from console.lab import netns

    ours = [ns for ns in netns.list_netns() if ns.startswith(lab.prefix)]
    assert len(ours) == len(lab.hypervisors) + 2  # + jump + switch
    for ns in ours:
        routes = netns.routes(ns)
        assert "default" not in routes, f"{ns} has a default route:\n{routes}"
        for line in routes.splitlines():
            assert " scope link " in f" {line} " or "proto kernel" in line, f"{ns}: {line}"
        forwarding = netns.in_ns(ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        assert forwarding == "0", f"{ns} forwards packets"
    # The root namespace's only route into the lab is the connected front /24.
    link_routes = netns.ip("route", "show", "dev", f"esc-{lab.name}").stdout.strip().splitlines()
    assert len(link_routes) == 1 and link_routes[0].startswith(f"198.18.{lab.index}.0/24")


@pytest.mark.lab
def test_fault_injection_round_trip(lab: Lab) -> None:
    host = "fra-2"
    lab.stop_sshd(host)
    try:
        assert not lab._sshd_answers(lab.host(host))
    finally:
        lab.start_sshd(host)
    assert lab._sshd_answers(lab.host(host))

    lab.cut_link(host)
    try:
        assert not lab._sshd_answers(lab.host(host))
    finally:
        lab.restore_link(host)
    deadline = time.monotonic() + 5
    while not lab._sshd_answers(lab.host(host)):
        assert time.monotonic() < deadline, "link did not come back"
        time.sleep(0.1)

    lab.stop_libvirtd(host)
    try:
        status = {s.name: s for s in lab.status()}
        assert not status[host].libvirtd_ok and status[host].problem.startswith("libvirtd")
    finally:
        lab.start_libvirtd(host)
    assert {s.name: s for s in lab.status()}[host].libvirtd_ok

    libvirt = _libvirt()
    name = f"victim-{secrets.token_hex(3)}"
    lab.define_guest(host, name)
    conn = lab.open_libvirt(host)
    try:
        dom = conn.lookupByName(name)
        assert dom.isActive()
        lab.kill_qemu(host, name)
        deadline = time.monotonic() + 5
        while dom.isActive():
            assert time.monotonic() < deadline, "libvirt did not notice the killed QEMU"
            time.sleep(0.05)
        state, reason = dom.state()
        assert state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
        dom.undefine()
    finally:
        conn.close()


def _migrate(lab: Lab, dom: Any, dst: str, dconn: Any) -> Any:
    libvirt = _libvirt()
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{lab.host(dst).migration_ip}",
              libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION: dst}
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_TLS | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    return dom.migrate3(dconn, params, flags)


@pytest.mark.lab
def test_tls_live_migration_fra1_to_par1_and_refused_to_rogue(lab: Lab) -> None:
    libvirt = _libvirt()
    name = f"smoke-{secrets.token_hex(3)}"
    # 16 MiB of random RAM: the migration has real (incompressible) pages to send.
    # A second Lab object for the same lab (as another process would have): it reads
    # the owners' keys back from DIR/pki to sign the guest's policy.
    from console.lab import Lab as LabClass

    vm_uuid = LabClass(lab.dir, lab.name).define_guest("fra-1", name, memory_mib=64,
                                                       random_fill_mib=16, owner="alice")
    src, dst, rogue = (lab.open_libvirt(h) for h in ("fra-1", "par-1", ROGUE))
    try:
        dom = src.lookupByName(name)
        token_before = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                    "https://escort.dev/xmlns/policy/1")
        # QEMU on rogue-1 trusts only the rogue root, and fra-1 only the tree.
        with pytest.raises(libvirt.libvirtError, match=r"known issuer|certificate"):
            _migrate(lab, dom, ROGUE, rogue)
        assert dom.isActive(), "a refused migration must leave the VM running on the source"

        moved = _migrate(lab, dom, "par-1", dst)
        assert moved.isActive() and moved.UUIDString() == vm_uuid
        assert name not in [d.name() for d in src.listAllDomains()], "source must be undefined"
        assert moved.isPersistent()
        stats = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        # The random blob cannot be compressed away as zero pages: it was really sent.
        assert stats.get("data_processed", 0) >= 16 * 1024 * 1024, stats
        assert moved.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                              "https://escort.dev/xmlns/policy/1") == token_before
    finally:
        with _suppress_libvirt():
            d = dst.lookupByName(name)
            d.destroy()
            d.undefine()
        with _suppress_libvirt():
            d = src.lookupByName(name)
            d.destroy()
            d.undefine()
        for c in (src, dst, rogue):
            c.close()


class _suppress_libvirt:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        return typ is not None and issubclass(typ, _libvirt().libvirtError)


def test_lab_commands_refuse_non_root_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere (no lab needed): the non-root path of `escort lab`."""
    from console.cli import main

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    for sub in ("up", "down", "status"):
        result = CliRunner().invoke(main, ["lab", sub, "--dir", "/nonexistent/lab"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "root" in lines[0], result.output


@pytest.mark.lab
def test_fleet_file_describes_the_lab(lab: Lab) -> None:
    from console.adapters.fleetfile import load_fleet

    fleet = load_fleet(lab.fleet_file)
    assert fleet.kind == "lab"
    assert [h.name for h in fleet.hosts] == lab.hypervisors
    for spec in fleet.hosts:
        host = lab.host(spec.name)
        assert spec.ssh == f"root@{host.ssh_ip}" and spec.jump == f"root@{lab.jump.ssh_ip}"
        assert spec.migration_address == host.migration_ip and spec.tls_name == spec.name
        assert Path(spec.cert_file).read_bytes() == (host.pki_dir / "server-cert.pem").read_bytes()
    known = Path(fleet.known_hosts).read_text()
    for host in lab.all_hosts():
        key = (host.root / "etc" / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[1]
        assert f"{host.ssh_ip} ssh-ed25519 {key}" in known.replace(",", " ")


# --- no lab needed: the pure parts -------------------------------------------------

def test_lab_names_must_fit_interface_names() -> None:
    from console.core.errors import InputError
    from console.lab.hosts import check_name, client_link

    assert len(client_link(check_name("abcdefghij"))) <= 15
    for bad in ("", "Demo", "1abc", "a-b", "abcdefghijk", "a b"):
        with pytest.raises(InputError):
            check_name(bad)


def test_lab_certificates_are_what_qemu_needs() -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from console.lab import certs
    from console.lab.hosts import HYPERVISORS

    ips = {p.name: f"198.19.7.{p.octet}" for p in HYPERVISORS}
    pki = certs.build("unit", HYPERVISORS, ips)
    for plan in HYPERVISORS:
        cert, _key = pki.hosts[plan.name]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [plan.name]
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == [ips[plan.name]]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
        bundle = x509.load_pem_x509_certificates(pki.qemu_ca_bundle(plan))
        if plan.issuer == "rogue":
            assert cert.issuer == pki.rogue_root.cert.subject
            assert bundle == [pki.rogue_root.cert]
        else:
            assert cert.issuer == pki.intermediates[plan.issuer].cert.subject
            assert set(bundle) == {pki.root.cert, *(i.cert for i in pki.intermediates.values())}


def test_guest_xml_random_fill_and_limits(tmp_path: Path) -> None:
    from console.lab import guests

    blob = guests.blob_path(tmp_path, 1)
    assert blob.stat().st_size == 1024 * 1024
    xml = guests.domain_xml("g", memory_mib=64, random_blob=blob, metadata_xml="<x:y xmlns:x='u'/>")
    assert "qemu:commandline" in xml and f"loader,file={blob}" in xml and "<x:y" in xml
    assert "<disk" not in xml
    with pytest.raises(ValueError):
        guests.domain_xml("g", memory_mib=16, random_blob=blob)
