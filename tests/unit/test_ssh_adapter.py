"""SshPool against real in-process asyncssh servers on 127.0.0.1 (port 0).

The servers run commands with a real shell on this machine, so ``read_file`` is
exercised with the real ``head``; jump hosts forward real TCP connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from console.adapters.ssh import (
    AUTH_FAILED,
    JUMP_FAILED,
    KEY_CHANGED,
    KEY_REVOKED,
    KEY_UNKNOWN,
    READ_FAILED,
    TIMED_OUT,
    UNREACHABLE,
    HostKeyProblem,
    HostProblem,
    SshPool,
    parse_target,
)


@dataclass
class FakeHost:
    """One in-process SSH server and what it saw."""

    server: asyncssh.SSHAcceptor
    port: int
    host_key: asyncssh.SSHKey
    users: list[str] = field(default_factory=list)
    forwards: list[tuple[str, int]] = field(default_factory=list)
    unix_forwards: list[str] = field(default_factory=list)
    conns: list[asyncssh.SSHServerConnection] = field(default_factory=list)
    logins: int = 0

    async def kill(self) -> None:
        """Stop listening and drop every open connection (a host going down)."""
        self.server.close()
        await self.server.wait_closed()
        for conn in self.conns:
            conn.abort()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        pub = (key or self.host_key).export_public_key("openssh").decode().strip()
        return f"[127.0.0.1]:{self.port} {pub}"


async def _run_shell(process: asyncssh.SSHServerProcess[bytes]) -> None:
    proc = await asyncio.create_subprocess_shell(
        process.command or "true",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    process.stdout.write(out)
    process.stderr.write(err)
    process.exit(proc.returncode or 0)


def _server_class(fake_ref: list[FakeHost]) -> Callable[[], asyncssh.SSHServer]:
    class _Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            fake_ref[0].conns.append(conn)

        def unix_connection_requested(self, dest_path: str) -> bool:
            fake_ref[0].unix_forwards.append(dest_path)
            return True

        def begin_auth(self, username: str) -> bool:
            fake_ref[0].users.append(username)
            return True

        def auth_completed(self) -> None:
            fake_ref[0].logins += 1

        def connection_requested(
            self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
        ) -> bool:
            fake_ref[0].forwards.append((dest_host, dest_port))
            return True  # act as a jump host

    return _Server


@pytest.fixture
def client_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stray ~/.ssh keys or config
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_ed25519"
    key.write_private_key(path)
    (tmp_path / "id_ed25519.pub").write_bytes(key.export_public_key())
    return path


@pytest.fixture
async def make_host(client_key: Path) -> AsyncIterator[Callable[..., Awaitable[FakeHost]]]:
    servers: list[FakeHost] = []

    async def _make(
        authorized: Path | None = None, *, port: int = 0, host_key: asyncssh.SSHKey | None = None,
        sftp: bool = False,
    ) -> FakeHost:
        host_key = host_key or asyncssh.generate_private_key("ssh-ed25519")
        pub = (authorized or client_key.with_suffix(".pub")).read_text()
        ref: list[FakeHost] = []
        server = await asyncssh.create_server(
            _server_class(ref),
            "127.0.0.1",
            port,
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(pub),
            process_factory=_run_shell,
            encoding=None,
            sftp_factory=sftp,  # True: asyncssh's SFTP server on this machine's files
        )
        port = server.sockets[0].getsockname()[1]
        fake = FakeHost(server, port, host_key)
        ref.append(fake)
        servers.append(fake)
        return fake

    yield _make
    for fake in servers:
        await fake.kill()


def _known_hosts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _pool(tmp_path: Path, client_key: Path, *hosts: FakeHost, **kw: float) -> SshPool:
    kh = _known_hosts(tmp_path, *(h.known_hosts_line() for h in hosts))
    return SshPool(known_hosts=str(kh), config=None, identity_files=[str(client_key)], **kw)


async def test_known_host_accepted_and_connection_reused(tmp_path, client_key, make_host):
    host = await make_host()
    pool = _pool(tmp_path, client_key, host)
    try:
        out1 = await pool.run(host.addr, "echo one")
        out2 = await pool.run(host.addr, "echo two")
        assert (out1, out2) == (b"one\n", b"two\n")
        assert pool.connects == 1 and host.logins == 1
        # Concurrent first use of another destination still opens one connection.
        await pool.drop(host.addr)
        await asyncio.gather(*(pool.run(host.addr, "true") for _ in range(5)))
        assert pool.connects == 2 and host.logins == 2
    finally:
        await pool.close()


async def test_known_hosts_parsed_once_not_per_connect(tmp_path, client_key, make_host):
    host = await make_host()
    pool = _pool(tmp_path, client_key, host)
    (tmp_path / "known_hosts").unlink()  # a path re-read per connect would now refuse
    try:
        assert await pool.run(host.addr, "echo ok") == b"ok\n"
    finally:
        await pool.close()


async def test_unknown_host_key_refused_with_fingerprint(tmp_path, client_key, make_host):
    host = await make_host()
    kh = _known_hosts(tmp_path)  # empty
    pool = SshPool(known_hosts=str(kh), identity_files=[str(client_key)])
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(host.addr, name="hosta")
    exc = err.value
    fp = host.host_key.get_fingerprint("sha256")
    assert exc.code == KEY_UNKNOWN
    assert fp in str(exc) and str(kh) in str(exc) and "hosta" in str(exc)
    assert "\n" not in str(exc)
    assert exc.known_hosts_line() == host.known_hosts_line()
    assert host.logins == 0
    await pool.close()


async def test_missing_known_hosts_file_refuses_everything(tmp_path, client_key, make_host):
    host = await make_host()
    pool = SshPool(known_hosts=str(tmp_path / "nope"), identity_files=[str(client_key)])
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(host.addr)
    assert err.value.code == KEY_UNKNOWN
    await pool.close()


@pytest.mark.timeout(20)
def test_known_hosts_that_is_a_fifo_or_directory_is_refused_not_waited_on(tmp_path, client_key):
    """A FIFO at the known_hosts path used to block the pool (and the console) for good."""
    for kind in ("fifo", "dir"):
        path = tmp_path / kind
        os.mkfifo(path) if kind == "fifo" else path.mkdir()
        with pytest.raises(HostProblem) as err:
            SshPool(known_hosts=str(path), identity_files=[str(client_key)])
        assert "cannot read known_hosts" in str(err.value) and str(path) in str(err.value)


async def test_changed_host_key_refused(tmp_path, client_key, make_host):
    host = await make_host()
    old = asyncssh.generate_private_key("ssh-ed25519")
    kh = _known_hosts(tmp_path, host.known_hosts_line(old))
    pool = SshPool(known_hosts=str(kh), identity_files=[str(client_key)])
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(host.addr)
    assert err.value.code == KEY_CHANGED
    assert "CHANGED" in str(err.value)
    assert host.host_key.get_fingerprint("sha256") in str(err.value)
    assert host.logins == 0
    # Accepting it deliberately (replace the line) and reloading lets it in.
    kh.write_text(err.value.known_hosts_line() + "\n")
    pool.reload_known_hosts()
    assert await pool.run(host.addr, "echo in") == b"in\n"
    await pool.close()


async def test_a_key_listed_for_the_address_does_not_vouch_for_a_name(tmp_path, client_key, make_host):
    """OpenSSH (CheckHostIP no, its default) looks known_hosts up by the name only.

    asyncssh also matched the address the connection reached: a key listed for another
    host's IP vouched for any name resolved (or spoofed) to that IP, even against the
    name's own line, where OpenSSH says REMOTE HOST IDENTIFICATION HAS CHANGED.
    """
    host = await make_host()
    pub = host.host_key.export_public_key("openssh").decode().strip()
    by_ip = f"[127.0.0.1]:{host.port} {pub}"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().strip()
    name = f"root@localhost:{host.port}"
    kh = _known_hosts(tmp_path, f"[localhost]:{host.port} {other}", by_ip)
    pool = SshPool(known_hosts=str(kh), config=None, identity_files=[str(client_key)])
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(name)
    assert err.value.code == KEY_CHANGED
    kh.write_text(by_ip + "\n")  # only the address's line: unknown, as in OpenSSH
    pool.reload_known_hosts()
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(name)
    assert err.value.code == KEY_UNKNOWN
    assert host.logins == 0
    assert await pool.run(host.addr, "echo ip") == b"ip\n"  # the address itself is known
    # An @revoked line for the address still refuses the key under any name.
    kh.write_text(f"[localhost]:{host.port} {pub}\n@revoked [127.0.0.1]:{host.port} {pub}\n")
    pool.reload_known_hosts()
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(name)
    assert err.value.code == KEY_REVOKED
    await pool.close()


async def test_an_address_range_in_known_hosts_vouches_for_no_host(tmp_path, client_key, make_host):
    """OpenSSH reads ``127.0.0.0/8`` in known_hosts as a name no host has; asyncssh as a network."""
    host = await make_host()
    pub = host.host_key.export_public_key("openssh").decode().strip()
    kh = _known_hosts(tmp_path, f"127.0.0.0/8 {pub}")
    pool = SshPool(known_hosts=str(kh), config=None, identity_files=[str(client_key)])
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(host.addr)
    assert err.value.code == KEY_UNKNOWN and host.logins == 0
    kh.write_text(f"127.0.0.0/8,[127.0.0.1]:{host.port} {pub}\n@revoked 127.0.0.0/8 {pub}\n")
    pool.reload_known_hosts()  # the range is dropped from trust, kept in @revoked
    with pytest.raises(HostKeyProblem) as err:
        await pool.connect(host.addr)
    assert err.value.code == KEY_REVOKED
    kh.write_text(f"10.0.0.0/8,[127.0.0.1]:{host.port} {pub}\n")
    pool.reload_known_hosts()
    assert await pool.run(host.addr, "echo ok") == b"ok\n"  # the plain name in the list still counts
    await pool.close()


async def test_sha1_rsa_host_signature_is_never_accepted(tmp_path, client_key, make_host):
    """A host offering only ssh-rsa (RSA with SHA-1) is refused, as by OpenSSH >= 8.8."""
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    sha1_only = asyncssh.import_private_key(rsa.export_private_key())
    sha1_only.sig_algorithms = (b"ssh-rsa",)  # the host offers ssh-rsa and nothing else
    host = await make_host(host_key=sha1_only)
    pool = _pool(tmp_path, client_key, host)  # its RSA key is in known_hosts
    with pytest.raises(HostProblem) as err:
        await pool.connect(host.addr)
    assert "ssh-rsa" in str(err.value) and "\n" not in str(err.value)
    assert host.logins == 0
    await pool.close()
    sha2 = await make_host(host_key=rsa)  # the same key signing with rsa-sha2-*: accepted
    pool = _pool(tmp_path, client_key, sha2)
    assert await pool.run(sha2.addr, "echo ok") == b"ok\n"
    await pool.close()


async def test_accept_host_key_only_with_the_checked_fingerprint(tmp_path, client_key, make_host):
    host = await make_host()
    kh = _known_hosts(tmp_path)
    pool = SshPool(known_hosts=str(kh), identity_files=[str(client_key)])
    try:
        wrong = asyncssh.generate_private_key("ssh-ed25519").get_fingerprint("sha256")
        with pytest.raises(HostProblem, match="nothing was added"):
            await pool.accept_host_key(host.addr, wrong)
        assert kh.read_text() == ""
        fp = host.host_key.get_fingerprint("sha256")
        line = await pool.accept_host_key(host.addr, fp)
        assert line == host.known_hosts_line()
        assert kh.read_text() == line + "\n"
        assert await pool.run(host.addr, "echo trusted") == b"trusted\n"
        assert await pool.accept_host_key(host.addr, fp) == ""  # already trusted
    finally:
        await pool.close()


async def test_accept_host_key_never_replaces_a_changed_key(tmp_path, client_key, make_host):
    host = await make_host()
    old = host.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519"))
    kh = _known_hosts(tmp_path, old)
    pool = SshPool(known_hosts=str(kh), identity_files=[str(client_key)])
    with pytest.raises(HostKeyProblem) as err:
        await pool.accept_host_key(host.addr, host.host_key.get_fingerprint("sha256"))
    assert err.value.code == KEY_CHANGED
    assert kh.read_text() == old + "\n"
    await pool.close()


async def test_agent_is_used_when_no_identity_file_is_given(
    tmp_path, client_key, make_host, monkeypatch
):
    host = await make_host()
    sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec(
        "ssh-agent", "-D", "-a", str(sock),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        client_key.chmod(0o600)
        add = await asyncio.create_subprocess_exec(
            "ssh-add", str(client_key), env={"SSH_AUTH_SOCK": str(sock), "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        assert await add.wait() == 0
        kh = _known_hosts(tmp_path, host.known_hosts_line())
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        pool = SshPool(known_hosts=str(kh))  # no identity file: only the agent has the key
        try:
            assert await pool.run(host.addr, "echo agent") == b"agent\n"
        finally:
            await pool.close()
        monkeypatch.delenv("SSH_AUTH_SOCK")
        pool = SshPool(known_hosts=str(kh))
        with pytest.raises(HostProblem) as err:
            await pool.connect(host.addr)
        assert err.value.code == AUTH_FAILED
        await pool.close()
    finally:
        agent.terminate()
        await agent.wait()


async def test_authentication_failure(tmp_path, client_key, make_host):
    other = tmp_path / "other.pub"
    other.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_public_key())
    host = await make_host(authorized=other)
    pool = _pool(tmp_path, client_key, host)
    with pytest.raises(HostProblem) as err:
        await pool.connect(f"alice@{host.addr}", name="hosta")
    assert err.value.code == AUTH_FAILED
    assert "authentication failed as alice@127.0.0.1" in str(err.value)
    await pool.close()


async def test_unreachable_closed_port(tmp_path, client_key):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = SshPool(known_hosts=str(_known_hosts(tmp_path)), identity_files=[str(client_key)])
    with pytest.raises(HostProblem) as err:
        await pool.connect(f"127.0.0.1:{port}", name="hostz")
    assert err.value.code == UNREACHABLE
    assert str(err.value).startswith("hostz: unreachable")
    await pool.close()


async def test_timeout_when_server_never_speaks(tmp_path, client_key):
    async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = SshPool(
        known_hosts=str(_known_hosts(tmp_path)),
        identity_files=[str(client_key)],
        connect_timeout=0.5,
        login_timeout=0.5,
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(HostProblem) as err:
        await pool.connect(f"127.0.0.1:{port}")
    assert err.value.code == TIMED_OUT
    assert loop.time() - start < 5
    server.close()
    await pool.close()


async def test_jump_host_tunnel_reused_across_hosts(tmp_path, client_key, make_host):
    jump, a, b = await make_host(), await make_host(), await make_host()
    pool = _pool(tmp_path, client_key, jump, a, b)
    try:
        assert await pool.run(a.addr, "echo a", jump=jump.addr) == b"a\n"
        assert await pool.run(b.addr, "echo b", jump=jump.addr) == b"b\n"
        assert jump.logins == 1 and a.logins == 1 and b.logins == 1
        assert sorted(jump.forwards) == sorted([("127.0.0.1", a.port), ("127.0.0.1", b.port)])
        assert pool.connects == 3
    finally:
        await pool.close()


async def test_jump_host_key_unknown_is_jump_failure(tmp_path, client_key, make_host):
    jump, a = await make_host(), await make_host()
    kh = _known_hosts(tmp_path, a.known_hosts_line())  # jump host not trusted
    pool = SshPool(known_hosts=str(kh), identity_files=[str(client_key)])
    with pytest.raises(HostProblem) as err:
        await pool.connect(a.addr, jump.addr, name="hosta")
    assert err.value.code == JUMP_FAILED
    assert f"jump host {jump.addr} failed" in str(err.value)
    assert jump.host_key.get_fingerprint("sha256") in str(err.value)
    assert isinstance(err.value, HostKeyProblem)
    assert err.value.known_hosts_line() == jump.known_hosts_line()
    assert a.logins == 0
    await pool.close()


async def test_target_unreachable_behind_jump(tmp_path, client_key, make_host):
    jump = await make_host()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = _pool(tmp_path, client_key, jump)
    with pytest.raises(HostProblem) as err:
        await pool.connect(f"127.0.0.1:{port}", jump.addr, name="hostb")
    assert err.value.code == UNREACHABLE
    assert "via jump host" in str(err.value)
    await pool.close()


async def test_ssh_config_alias_user_port_identity_and_proxyjump(tmp_path, client_key, make_host):
    jump, a = await make_host(), await make_host()
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host hosta\n  HostName 127.0.0.1\n  Port {a.port}\n  User alice\n"
        f"  IdentityFile {client_key}\n  ProxyJump jumpy\n"
        f"Host jumpy\n  HostName 127.0.0.1\n  Port {jump.port}\n  User bob\n"
        f"  IdentityFile {client_key}\n"
    )
    kh = _known_hosts(tmp_path, jump.known_hosts_line(), a.known_hosts_line())
    pool = SshPool(known_hosts=str(kh), config=str(config))  # keys only from the config
    try:
        assert pool.jump_chain("hosta") == ["jumpy"]
        assert await pool.run("hosta", "echo via") == b"via\n"
        assert a.users == ["alice"] and jump.users == ["bob"]
        assert jump.forwards == [("127.0.0.1", a.port)]
    finally:
        await pool.close()


async def test_read_file_and_its_failures(tmp_path, client_key, make_host):
    host = await make_host()
    cert = tmp_path / "server-cert.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    pool = _pool(tmp_path, client_key, host)
    try:
        assert await pool.read_file(host.addr, str(cert)) == cert.read_bytes()
        with pytest.raises(HostProblem) as err:
            await pool.read_file(host.addr, str(tmp_path / "missing.pem"), name="hosta")
        assert err.value.code == READ_FAILED
        assert "cannot read" in str(err.value) and "No such file" in str(err.value)
        with pytest.raises(HostProblem) as err:
            await pool.read_file(host.addr, str(big), limit=1024)
        assert "larger than 1 KiB" in str(err.value)
        weird = tmp_path / "it's; echo pwned"
        weird.write_bytes(b"quoted")
        assert await pool.read_file(host.addr, str(weird)) == b"quoted"
        assert pool.connects == 1
        assert pool.sftp_reads == 0  # this host has no SFTP subsystem: every read used exec
    finally:
        await pool.close()


async def test_read_file_over_sftp_when_the_host_offers_it(tmp_path, client_key, make_host):
    host = await make_host(sftp=True)
    cert = tmp_path / "server-cert.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    pool = _pool(tmp_path, client_key, host)
    try:
        assert await pool.read_file(host.addr, str(cert)) == cert.read_bytes()
        assert await pool.read_file(host.addr, str(cert)) == cert.read_bytes()
        assert pool.sftp_reads == 2 and pool.connects == 1
        with pytest.raises(HostProblem) as err:
            await pool.read_file(host.addr, str(tmp_path / "missing.pem"), name="hosta")
        assert err.value.code == READ_FAILED and "cannot read" in str(err.value)
        with pytest.raises(HostProblem) as err:
            await pool.read_file(host.addr, str(big), limit=1024)
        assert "larger than 1 KiB" in str(err.value)
        with pytest.raises(HostProblem) as err:  # bounded also for an endless file
            await pool.read_file(host.addr, "/dev/zero", limit=1024)
        assert "larger than 1 KiB" in str(err.value)
    finally:
        await pool.close()


async def test_reconnect_after_drop_and_server_side_close(tmp_path, client_key, make_host):
    host = await make_host()
    pool = _pool(tmp_path, client_key, host)
    try:
        conn = await pool.connect(host.addr)
        conn.close()
        await conn.wait_closed()
        assert await pool.run(host.addr, "echo again") == b"again\n"
        assert pool.connects == 2
    finally:
        await pool.close()


async def test_keepalive_notices_a_silent_peer(tmp_path, client_key, make_host):
    host = await make_host()
    pool = _pool(tmp_path, client_key, host, keepalive_interval=0.2, keepalive_count_max=2)
    try:
        conn = await pool.connect(host.addr)
        for server_conn in host.conns:
            server_conn._transport.pause_reading()  # the host hangs: nothing is answered
        for _ in range(50):
            if conn.is_closed():
                break
            await asyncio.sleep(0.05)
        assert conn.is_closed()
        assert pool.cached(host.addr) is None
        for server_conn in host.conns:
            server_conn._transport.resume_reading()
        assert await pool.run(host.addr, "echo back") == b"back\n"
        assert pool.connects == 2
    finally:
        await pool.close()


def test_close_threadsafe_runs_on_the_pool_loop(tmp_path, client_key):
    async def scenario() -> tuple[SshPool, asyncssh.SSHClientConnection]:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.with_suffix(".pub").read_text()),
        )
        port = server.sockets[0].getsockname()[1]
        pub = host_key.export_public_key("openssh").decode().strip()
        kh = _known_hosts(tmp_path, f"[127.0.0.1]:{port} {pub}")
        pool = SshPool(known_hosts=str(kh), identity_files=[str(client_key)])
        conn = await pool.connect(f"127.0.0.1:{port}")
        server.close()
        return pool, conn

    loop = asyncio.new_event_loop()
    try:
        pool, conn = loop.run_until_complete(scenario())
        assert not conn.is_closed()
        pool.close_threadsafe()  # loop not running: closes on it synchronously
        assert conn.is_closed()
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.sleep(0))
        loop.close()


@pytest.mark.parametrize(
    ("text", "host", "port", "user"),
    [
        ("hosta", "hosta", None, None),
        ("root@10.0.0.1:2222", "10.0.0.1", 2222, "root"),
        ("[::1]:22", "::1", 22, None),
        ("fe80::1", "fe80::1", None, None),
    ],
)
def test_parse_target(text, host, port, user):
    t = parse_target(text)
    assert (t.host, t.port, t.user) == (host, port, user)


@pytest.mark.parametrize("text", ["", "a b", "@host", "host:99999", "host:x", "[::1"])
def test_parse_target_refuses(text):
    with pytest.raises(HostProblem):
        parse_target(text)


def _route_pool(tmp_path: Path, config: str) -> SshPool:
    cfg = tmp_path / "route_config"
    cfg.write_text(config)
    return SshPool(known_hosts=str(tmp_path / "kh"), config=str(cfg))


def test_route_follows_each_jump_hosts_own_proxyjump(tmp_path, client_key):
    pool = _route_pool(tmp_path, (
        "Host c-par-1\n  HostName 10.0.0.3\n  ProxyJump c-fra-1\n"
        "Host c-fra-1\n  HostName 10.0.0.2\n  ProxyJump gw\n  User ops\n  Port 2222\n"
        "Host gw\n  HostName 10.0.0.1\n"))
    hops = pool.route("c-par-1")
    assert [h.spec for h in hops] == ["gw", "c-fra-1", "c-par-1"]
    assert (hops[1].host, hops[1].port, hops[1].user) == ("10.0.0.2", 2222, "ops")
    # fleet jump = ssh -J: replaces the destination's ProxyJump; "a,b": b reached with -J a
    assert pool.jump_chain("c-par-1", "gw") == ["gw"]
    assert pool.jump_chain("c-par-1", "c-fra-1") == ["gw", "c-fra-1"]
    assert pool.jump_chain("c-par-1", "other,c-fra-1") == ["other", "c-fra-1"]
    assert pool.jump_chain("c-par-1", "none") == []


def test_route_refuses_loops(tmp_path, client_key):
    pool = _route_pool(tmp_path, (
        "Host a\n  HostName 10.0.0.1\n  ProxyJump b\n"
        "Host b\n  HostName 10.0.0.2\n  ProxyJump a\n"
        "Host 10.0.0.9\n  ProxyJump 10.0.0.9\n"))
    for dest in ("a", "10.0.0.9"):
        with pytest.raises(HostProblem) as err:
            pool.route(dest)
        assert err.value.code == "host.jump_loop" and "jumphost loop via" in str(err.value)
    assert pool.cached("a") is None  # never raises


async def test_host_key_alias_names_the_known_hosts_line(tmp_path, client_key, make_host):
    """HostKeyAlias: known_hosts is searched under the alias (OpenSSH: without a port)."""
    a = await make_host()
    cfg = tmp_path / "alias_config"
    cfg.write_text(f"Host hv\n  HostName 127.0.0.1\n  Port {a.port}\n  HostKeyAlias hv-key\n"
                   f"  IdentityFile {client_key}\n")
    kh = _known_hosts(tmp_path)
    pool = SshPool(known_hosts=str(kh), config=str(cfg))
    try:
        with pytest.raises(HostKeyProblem) as err:
            await pool.connect("hv")
        assert err.value.code == KEY_UNKNOWN and "for hv-key:" in str(err.value)
        line = await pool.accept_host_key("hv", err.value.fingerprint)
        assert line.startswith("hv-key ssh-ed25519 ")  # as OpenSSH looks an alias up: no port
        assert await pool.run("hv", "echo ok") == b"ok\n"
    finally:
        await pool.close()


async def test_aes_gcm_first_unless_ssh_config_names_ciphers(tmp_path, client_key, make_host):
    """AES-GCM is offered first (cheaper per packet than asyncssh's chacha20); a host whose
    ssh_config block names Ciphers gets exactly what the config says."""
    host = await make_host()
    pool = _pool(tmp_path, client_key, host)
    try:
        await pool.run(host.addr, "true")
        conn = pool.cached(host.addr)
        assert conn is not None and conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
    finally:
        await pool.close()
    config = tmp_path / "ssh_config"
    config.write_text(f"Host hosta\n  HostName 127.0.0.1\n  Port {host.port}\n  IdentityFile {client_key}\n"
                      "  Ciphers aes256-ctr\n")
    kh = _known_hosts(tmp_path, host.known_hosts_line())
    pool = SshPool(known_hosts=str(kh), config=str(config))
    try:
        await pool.run("hosta", "true")
        conn = pool.cached("hosta")
        assert conn is not None and conn.get_extra_info("send_cipher") == "aes256-ctr"
    finally:
        await pool.close()
