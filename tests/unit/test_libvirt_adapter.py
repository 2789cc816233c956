"""The libvirt adapter against libvirt's test:/// driver (no daemon, no root)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path

import asyncssh
import libvirt
import pytest

from console.adapters.libvirt import (
    LibvirtHost,
    open_host,
    read_host_facts,
    remote_socket_path,
    state_name,
)
from console.adapters.ssh import LIBVIRT_DOWN, LIBVIRT_ERROR, HostProblem, SshPool
from console.core.inventory import HostSpec
from console.core.policy import POLICY_NS, policy_metadata_xml

UUID_A = "11111111-2222-3333-4444-555555555555"
UUID_B = "66666666-7777-8888-9999-000000000000"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJvd25lciJ9.c2lnbmF0dXJl"


def node_xml(tmp_path: Path, *, cpus: int = 6, memory_kib: int = 8 * 1024 * 1024) -> str:
    path = tmp_path / "node.xml"
    path.write_text(
        f"""<node>
  <cpu><mhz>2000</mhz><model>test</model><active>{cpus}</active><nodes>1</nodes>
       <sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>
  <memory>{memory_kib}</memory>
  <domain type="test"><name>vm-a</name><uuid>{UUID_A}</uuid>
    <memory unit="MiB">512</memory><vcpu>2</vcpu><os><type>hvm</type></os></domain>
  <domain type="test"><name>vm-b</name><uuid>{UUID_B}</uuid>
    <memory unit="MiB">1024</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>
</node>
"""
    )
    return f"test://{path}"


@pytest.fixture
async def host(tmp_path: Path):
    h = await open_host(HostSpec(name="hosta", libvirt_uri=node_xml(tmp_path)))
    yield h
    await h.close()


async def test_host_and_domain_facts(host: LibvirtHost):
    facts = await host.facts()
    assert facts.memory_mib == 8192 and facts.cpus == 6
    assert facts.hostname
    assert [d.name for d in facts.domains] == ["vm-a", "vm-b"]
    a, b = facts.domains
    assert (a.uuid, a.state, a.memory_mib, a.vcpus, a.persistent) == (UUID_A, "running", 512, 2, True)
    assert (b.memory_mib, b.vcpus) == (1024, 1)
    assert a.policy_token == "" and a.policy_xml == ""
    assert facts.fetched_at is not None


async def test_state_reason_from_libvirt(host: LibvirtHost):
    dom = await host.call(host.conn.lookupByName, "vm-b")
    await host.call(dom.suspend)
    facts = await host.facts()
    b = next(d for d in facts.domains if d.name == "vm-b")
    assert (b.state, b.state_reason) == ("paused", "user")
    await host.call(dom.destroy)
    b = next(d for d in (await host.facts()).domains if d.name == "vm-b")
    assert (b.state, b.state_reason) == ("shut off", "destroyed")


async def test_domain_vanishing_mid_read_is_skipped(host: LibvirtHost):
    conn = host.conn
    xml = "<domain type='test'><name>tmp</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    dom = await host.call(conn.createXML, xml, 0)
    stale = await host.call(conn.listAllDomains, 0)
    await host.call(dom.destroy)  # transient: gone now, but still in our listing

    class StaleListing:
        def __getattr__(self, attr: str) -> object:
            return getattr(conn, attr)

        def listAllDomains(self, flags: int) -> list[object]:
            return list(stale)

    facts = await host.call(read_host_facts, StaleListing())
    assert [d.name for d in facts.domains] == ["vm-a", "vm-b"]


def test_state_names_cover_migration_pause():
    assert state_name(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION) == (
        "paused",
        "migration",
    )
    assert state_name(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED) == (
        "running",
        "migrated",
    )
    assert state_name(99, 0) == ("state 99", "")


async def test_policy_metadata_read_and_decoded(host: LibvirtHost):
    dom = await host.call(host.conn.lookupByName, "vm-a")
    # setMetadata wants the fragment without a namespace (libvirt adds key+uri).
    await host.call(
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        f'<policy ver="1">{TOKEN}</policy>',
        "escort",
        POLICY_NS,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    facts = await host.facts()
    a = next(d for d in facts.domains if d.name == "vm-a")
    b = next(d for d in facts.domains if d.name == "vm-b")
    assert a.policy_token == TOKEN
    assert TOKEN in a.policy_xml
    assert b.policy_token == ""


async def test_policy_in_domain_xml_as_the_lab_defines_it(host: LibvirtHost):
    """A domain defined with core.policy's namespaced element (what lab/demo write)."""
    xml = (
        '<domain type="test"><name>vm-c</name><memory unit="MiB">256</memory>'
        f"<os><type>hvm</type></os><metadata>{policy_metadata_xml(TOKEN)}</metadata></domain>"
    )
    await host.call(host.conn.defineXML, xml)
    c = next(d for d in (await host.facts()).domains if d.name == "vm-c")
    assert c.policy_token == TOKEN
    assert (c.state, c.persistent, c.memory_mib) == ("shut off", True, 256)


async def test_malformed_policy_metadata_is_not_silently_absent(host: LibvirtHost):
    dom = await host.call(host.conn.lookupByName, "vm-a")
    bad = f'<policy xmlns="{POLICY_NS}"><nested/>x</policy>'
    await host.call(
        dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, bad, "escort", POLICY_NS,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    a = next(d for d in (await host.facts()).domains if d.name == "vm-a")
    assert a.policy_token != "" and a.policy_xml != ""


async def test_calls_run_in_the_hosts_single_thread(host: LibvirtHost):
    main = threading.get_ident()
    seen: list[tuple[str, int]] = []
    spans: list[tuple[float, float]] = []

    def probe() -> None:
        start = time.perf_counter()
        seen.append((threading.current_thread().name, threading.get_ident()))
        time.sleep(0.05)
        spans.append((start, time.perf_counter()))

    await asyncio.gather(*(host.call(probe) for _ in range(4)))
    names = {n for n, _ in seen}
    idents = {i for _, i in seen}
    assert all(n.startswith("libvirt-hosta") for n in names)
    assert len(idents) == 1 and main not in idents
    spans.sort()
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))


async def test_long_calls_do_not_block_the_hosts_thread(host: LibvirtHost):
    started = asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()

    def long_call() -> str:
        loop.call_soon_threadsafe(started.set)
        release.wait(30)  # held until facts() has answered: it must not queue behind this
        return threading.current_thread().name

    long = asyncio.create_task(host.call_long(long_call))
    await started.wait()
    try:
        facts = await asyncio.wait_for(host.facts(), 20)
    finally:
        release.set()
    assert facts.domains
    assert (await long).startswith("libvirt-hosta-long")
    with pytest.raises(HostProblem) as err:
        await host.call_long(host.conn.lookupByName, "nope")
    assert err.value.code == LIBVIRT_ERROR


async def test_two_hosts_run_in_parallel(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ha = await open_host(HostSpec(name="a", libvirt_uri=node_xml(tmp_path / "a")))
    hb = await open_host(HostSpec(name="b", libvirt_uri=node_xml(tmp_path / "b")))
    # Both calls must be inside their threads at once to pass the barrier; if one
    # host's call waited for the other's, the barrier would break (timeout).
    meet = threading.Barrier(2, timeout=20)
    try:
        await asyncio.gather(ha.call(meet.wait), hb.call(meet.wait))
    finally:
        await ha.close()
        await hb.close()


async def test_libvirt_error_is_one_line_problem(host: LibvirtHost):
    with pytest.raises(HostProblem) as err:
        await host.call(host.conn.lookupByName, "no-such-vm")
    assert err.value.code == LIBVIRT_ERROR
    assert str(err.value).startswith("hosta: libvirt: ")
    assert "Domain not found" in str(err.value) and "\n" not in str(err.value)


async def test_closed_host_refuses_calls(tmp_path: Path):
    h = await open_host(HostSpec(name="hosta", libvirt_uri=node_xml(tmp_path)))
    await h.close()
    with pytest.raises(HostProblem):
        await h.call(h.conn.getHostname)


async def test_unopenable_uri_is_libvirt_down(tmp_path: Path):
    spec = HostSpec(name="hostx", libvirt_uri=f"qemu+unix:///system?socket={tmp_path}/none")
    with pytest.raises(HostProblem) as err:
        await open_host(spec)
    assert err.value.code == LIBVIRT_DOWN
    assert str(err.value).startswith("hostx: libvirt down: ")


def test_remote_socket_path():
    assert remote_socket_path("qemu:///system") == "/run/libvirt/libvirt-sock"
    assert remote_socket_path("qemu+unix:///system?socket=/x/sock") == "/x/sock"
    with pytest.raises(HostProblem):
        remote_socket_path("qemu+tcp://h/system")
    with pytest.raises(HostProblem):
        remote_socket_path("qemu:///session")


async def test_through_ssh_forward_with_libvirt_socket_missing(tmp_path: Path, monkeypatch):
    """The forward is made on our pooled SSH connection; no daemon there -> libvirt down."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    client = asyncssh.generate_private_key("ssh-ed25519")
    keyfile = tmp_path / "id"
    client.write_private_key(keyfile)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    asked: list[str] = []

    class Server(asyncssh.SSHServer):
        def unix_connection_requested(self, dest_path: str) -> bool:
            asked.append(dest_path)
            return True

    server = await asyncssh.create_server(
        Server, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client.export_public_key().decode()),
    )
    port = server.sockets[0].getsockname()[1]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    pool = SshPool(known_hosts=str(kh), identity_files=[str(keyfile)])
    missing = tmp_path / "remote" / "libvirt-sock"
    spec = HostSpec(
        name="hosta", ssh=f"127.0.0.1:{port}",
        libvirt_uri=f"qemu:///system?socket={missing}",
    )
    try:
        with pytest.raises(HostProblem) as err:
            await open_host(spec, pool)
        assert err.value.code == LIBVIRT_DOWN
        assert asked == [str(missing)]
        assert pool.connects == 1
    finally:
        await pool.close()
        server.close()
