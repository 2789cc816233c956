"""escort's SSH against the lab, each case run with the plain OpenSSH client as the control.

Every test writes ordinary OpenSSH files (an ssh_config, a known_hosts, keys and host
certificates made with the real ``ssh-keygen``, a real ``ssh-agent``) and runs both
``ssh -F <config> ...`` and escort's :class:`SshPool` (or the ``escort`` CLI) on the very
same files; escort must land where OpenSSH lands, or refuse where OpenSSH refuses.

The lab's hypervisors are only reachable through its jump host: a connection that skips
a hop fails with "No route to host", so a host answering ``hostname`` proves the route.
Tests leave the lab as they found it (extra sshds stopped, authorized_keys restored).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tomli_w

from console.adapters.ssh import (
    AUTH_FAILED,
    HOST_CERT_CA_UNKNOWN,
    HOST_CERT_EXPIRED,
    HOST_CERT_PRINCIPAL,
    JUMP_FAILED,
    JUMP_LOOP,
    KEY_CHANGED,
    KEY_UNKNOWN,
    HostProblem,
    SshPool,
)

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

CERT_PORT = 2200  # the extra sshd presenting a host certificate (fra-2)
JUMP_PORT = 2222  # the extra sshd on the jump host (a non-22 jump port)


# -- helpers -------------------------------------------------------------------------
def _run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 60,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env,
                          input=input, check=False)


def _env(home: Path, agent: str = "") -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    if agent:
        env["SSH_AUTH_SOCK"] = agent
    return env


def openssh(config: Path, *args: str, home: Path, agent: str = "") -> subprocess.CompletedProcess[str]:
    """The control: plain OpenSSH on the same files (BatchMode: it never prompts either)."""
    return _run("ssh", "-F", str(config), "-o", "BatchMode=yes", *args, env=_env(home, agent))


def common_block(known: Path, identity: Path | None = None, *, user: str = "root") -> str:
    ident = f"  IdentityFile {identity}\n  IdentitiesOnly yes\n" if identity else ""
    return (f"Host *\n  User {user}\n{ident}  UserKnownHostsFile {known}\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  ConnectTimeout 5\n"
            "  LogLevel ERROR\n")


def escort_run(config: Path, known: Path, ssh: str, *, jump: str = "",
               identity_files: tuple[str, ...] = (), command: str = "hostname",
               agent_timeout: float = 5.0, check_route: Any = None) -> str | HostProblem:
    """escort's SshPool on the same files: the command's output, or the problem."""
    async def go() -> str | HostProblem:
        pool = SshPool(known_hosts=str(known), config=str(config), identity_files=identity_files,
                       connect_timeout=5, login_timeout=10, agent_timeout=agent_timeout)
        try:
            out = (await pool.run(ssh, command, jump=jump, name=ssh)).decode()
            if check_route is not None:
                check_route(pool)
            return out
        except HostProblem as exc:
            return exc
        finally:
            await pool.close()
    return asyncio.run(go())


def _escort_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True,
                          timeout=180, env=env, check=False)


def host_pub(lab: Lab, host: str) -> str:
    return (lab.host(host).root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().strip()


def fingerprint(pub_file: Path) -> str:
    out = _run("ssh-keygen", "-lf", str(pub_file))
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[1]


def kh_line(name: str, pub: str) -> str:
    return f"{name} {' '.join(pub.split()[:2])}\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME for both clients: no ~/.ssh keys or config leak into a test."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return h


@pytest.fixture
def known(lab: Lab, tmp_path: Path) -> Path:
    """The lab's host keys (jump and hypervisors, by name and address)."""
    path = tmp_path / "known_hosts"
    path.write_text(lab.known_hosts.read_text())
    return path


@pytest.fixture
def authorize(lab: Lab) -> Iterator[Any]:
    """Add a public key to root's authorized_keys on lab hosts; restored afterwards."""
    saved: dict[Path, bytes] = {}

    def add(pub: Path, *hosts: str, user: str = "root") -> None:
        for host in hosts:
            path = lab.host(host).root / "etc/ssh/authorized_keys" / user
            if path not in saved:
                saved[path] = path.read_bytes() if path.exists() else b""
            path.write_bytes(saved[path] + pub.read_bytes())
    yield add
    for path, data in saved.items():
        if data:
            path.write_bytes(data)
        else:
            path.unlink(missing_ok=True)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[str]:
    """A real ssh-agent on its own socket (foreground, stopped by its pid)."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), "ssh-agent did not start"
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ssh_add(agent_sock: str, key: Path, passphrase: str, tmp_path: Path) -> None:
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
    askpass.chmod(0o700)
    env = {**_env(tmp_path, agent_sock), "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
           "DISPLAY": ":0"}
    out = _run("ssh-add", str(key), env=env, input="")
    assert out.returncode == 0, out.stderr


def keygen(path: Path, passphrase: str = "") -> Path:
    out = _run("ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path))
    assert out.returncode == 0, out.stderr
    return path


def jump_ip(lab: Lab) -> str:
    return lab.jump.ssh_ip


def ip(lab: Lab, host: str) -> str:
    return lab.host(host).ssh_ip


# -- 1. ProxyJump exactly as OpenSSH ---------------------------------------------------
def nested_config(lab: Lab, tmp_path: Path, known: Path) -> Path:
    """c-par-1 -> ProxyJump c-fra-1 -> ProxyJump gw: the issue's bastion case."""
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host gw\n  HostName {jump_ip(lab)}\n"
        f"Host c-fra-1\n  HostName {ip(lab, 'fra-1')}\n  ProxyJump gw\n"
        f"Host c-par-1\n  HostName {ip(lab, 'par-1')}\n  ProxyJump c-fra-1\n"
        + common_block(known, lab.identity))
    return cfg


def _established(lab: Lab, on_host: str, dst: str) -> list[str]:
    out = _run("ip", "netns", "exec", lab.host(on_host).ns, "ss", "-Htn", "state", "established",
               "dst", f"{dst}:22")
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_nested_proxyjump_goes_through_every_hop(lab: Lab, tmp_path: Path, home: Path, known: Path):
    cfg = nested_config(lab, tmp_path, known)
    control = openssh(cfg, "c-par-1", "hostname", home=home)
    assert control.returncode == 0 and control.stdout.strip() == "par-1", control.stderr

    def route(pool: SshPool) -> None:
        assert pool.jump_chain("c-par-1") == ["gw", "c-fra-1"]
        # the tunnel to par-1 leaves from fra-1 (not from the jump host directly)
        assert _established(lab, "fra-1", ip(lab, "par-1"))
    assert escort_run(cfg, known, "c-par-1", check_route=route) == "par-1\n"


def test_fleet_jump_replaces_the_hosts_proxyjump_like_ssh_J(lab: Lab, tmp_path: Path, home: Path,
                                                            known: Path):
    """fleet ``jump`` = ``ssh -J``: the destination's own ProxyJump is replaced; a list
    ``a,b`` reaches b with ``-J a`` (b's own ProxyJump ignored), a single jump follows
    its own block."""
    cfg = nested_config(lab, tmp_path, known)
    for jump, chain in (("gw", ["gw"]), ("gw,c-fra-1", ["gw", "c-fra-1"]), ("c-fra-1", ["gw", "c-fra-1"])):
        control = openssh(cfg, "-J", jump, "c-par-1", "hostname", home=home)
        assert control.returncode == 0 and control.stdout.strip() == "par-1", (jump, control.stderr)

        def route(pool: SshPool, jump: str = jump, chain: list[str] = chain) -> None:
            assert pool.jump_chain("c-par-1", jump) == chain
        assert escort_run(cfg, known, "c-par-1", jump=jump, check_route=route) == "par-1\n"
    # a two-hop fleet jump to a plain address (works already, must keep working)
    control = openssh(cfg, "-J", "gw,c-fra-1", f"root@{ip(lab, 'fra-2')}", "hostname", home=home)
    assert control.stdout.strip() == "fra-2", control.stderr
    assert escort_run(cfg, known, f"root@{ip(lab, 'fra-2')}", jump="gw,c-fra-1") == "fra-2\n"


def test_jump_hosts_own_user_port_identityfile_and_hostname(lab: Lab, tmp_path: Path, home: Path,
                                                            known: Path, authorize: Any):
    """The jump host's block alone says HostName, Port (non-22), User and IdentityFile."""
    jump_key = keygen(tmp_path / "jump_only_key")
    authorize(jump_key.with_suffix(".pub"), "jump", user="nobody")
    lab.start_extra_sshd("jump", JUMP_PORT)
    try:
        with known.open("a") as fh:
            fh.write(kh_line(f"[{jump_ip(lab)}]:{JUMP_PORT}", host_pub(lab, "jump")))
        cfg = tmp_path / "ssh_config"
        cfg.write_text(
            f"Host bastion\n  HostName {jump_ip(lab)}\n  Port {JUMP_PORT}\n  User nobody\n"
            f"  IdentityFile {jump_key}\n  IdentitiesOnly yes\n"
            f"Host c-fra-2\n  HostName {ip(lab, 'fra-2')}\n  User root\n  ProxyJump bastion\n"
            f"  IdentityFile {lab.identity}\n  IdentitiesOnly yes\n"
            + common_block(known, user="nobody-else"))
        control = openssh(cfg, "c-fra-2", "hostname", home=home)
        assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr
        assert escort_run(cfg, known, "c-fra-2") == "fra-2\n"
        log = (lab.jump.log_dir / f"sshd-{JUMP_PORT}.log").read_text()
        assert "Accepted publickey for nobody" in log
    finally:
        lab.stop_extra_sshd("jump", JUMP_PORT)


def test_proxyjump_loops_are_refused(lab: Lab, tmp_path: Path, home: Path, known: Path):
    fra1 = ip(lab, "fra-1")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host {fra1}\n  ProxyJump {fra1}\n"  # a host that jumps through itself
        "Host loop-a\n  HostName 198.18.255.1\n  ProxyJump loop-b\n"
        "Host loop-b\n  HostName 198.18.255.2\n  ProxyJump loop-a\n"
        + common_block(known, lab.identity))
    control = openssh(cfg, fra1, "hostname", home=home)
    assert control.returncode == 255 and f"jumphost loop via {fra1}" in control.stderr
    got = escort_run(cfg, known, fra1)
    assert isinstance(got, HostProblem) and got.code == JUMP_LOOP
    assert f"jumphost loop via {fra1}" in str(got) and "\n" not in str(got) and got.fix
    # A longer loop: OpenSSH would start ssh inside ssh without end (not run here);
    # `ssh -G` shows the two blocks point at each other, and escort refuses at once.
    shown = _run("ssh", "-F", str(cfg), "-G", "loop-a", env=_env(home)).stdout
    assert "proxyjump loop-b" in shown
    got = escort_run(cfg, known, "loop-a")
    assert isinstance(got, HostProblem) and got.code == JUMP_LOOP and "loop-b" in str(got)


def _fleet(lab: Lab, tmp_path: Path, name: str, *, config: Path | None = None,
           known: Path | None = None, hosts: dict[str, dict[str, str]] | None = None,
           identity_files: list[str] | None = None) -> Path:
    """A copy of the lab fleet beside it (relative paths still resolve), with changes."""
    doc = tomllib.loads(lab.fleet_file.read_text())
    if config is not None:
        doc["ssh_config"] = str(config)
    if known is not None:
        doc["known_hosts"] = str(known)
    if identity_files is not None:
        doc["identity_files"] = identity_files
    for h in doc["hosts"]:
        h.update((hosts or {}).get(h["name"], {}))
    path = lab.fleet_file.with_name(f"fleet-{name}-{os.getpid()}.toml")
    path.write_text(tomli_w.dumps(doc))
    return path


def test_refresh_with_nested_proxyjump_and_one_loop(lab: Lab, tmp_path: Path, home: Path, known: Path):
    """Through the CLI: par-1 by its alias (two nested jumps), fra-2 in a loop (one line,
    naming the host and the fix), every other host still refreshes."""
    cfg = nested_config(lab, tmp_path, known)
    with cfg.open("a") as fh:
        fh.write("Host c-loop\n  HostName 198.18.255.3\n  ProxyJump c-loop2\n"
                 "Host c-loop2\n  HostName 198.18.255.4\n  ProxyJump c-loop\n")
    fleet = _fleet(lab, tmp_path, "nested", config=cfg, known=known, identity_files=[],
                   hosts={"par-1": {"ssh": "c-par-1", "jump": ""}, "fra-2": {"ssh": "c-loop", "jump": ""}})
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json",
                      env={**os.environ, "HOME": str(home)})
    rows = {r["host"]: r for r in json.loads(out.stdout)["hosts"]}
    assert out.returncode == 1
    assert rows["par-1"]["reachable"] == "up" and rows["par-1"]["cert_valid"] is True
    assert rows["fra-1"]["reachable"] == "up" and rows["rogue-1"]["reachable"] == "up"
    assert rows["fra-2"]["problem"]["code"] == JUMP_LOOP
    assert rows["fra-2"]["problem"]["message"].startswith("fra-2: jumphost loop via")
    assert rows["fra-2"]["problem"]["fix"]
    assert "Traceback" not in out.stderr


# -- works already, must keep working ------------------------------------------------------
def test_include_aliases_hashed_known_hosts_and_strict_keys(lab: Lab, tmp_path: Path, home: Path,
                                                           known: Path):
    inc = tmp_path / "hosts.conf"
    inc.write_text(f"Host gw\n  HostName {jump_ip(lab)}\n"
                   f"Host hv-fra-1 hv-fra-1.example\n  HostName {ip(lab, 'fra-1')}\n  ProxyJump gw\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Include {inc}\n" + common_block(known, lab.identity))
    hashed = _run("ssh-keygen", "-H", "-f", str(known))
    assert hashed.returncode == 0, hashed.stderr
    assert ip(lab, "fra-1") not in known.read_text()  # every name is hashed now
    for alias in ("hv-fra-1", "hv-fra-1.example"):
        control = openssh(cfg, alias, "hostname", home=home)
        assert control.returncode == 0 and control.stdout.strip() == "fra-1", control.stderr
        assert escort_run(cfg, known, alias) == "fra-1\n"
    # strict host keys: fra-1's line replaced by another key -> both refuse
    plain = tmp_path / "known_plain"
    other = keygen(tmp_path / "not_fra1").with_suffix(".pub").read_text()
    plain.write_text(kh_line(jump_ip(lab), host_pub(lab, "jump")) + kh_line(ip(lab, "fra-1"), other))
    cfg.write_text(f"Include {inc}\n" + common_block(plain, lab.identity))
    control = openssh(cfg, "hv-fra-1", "hostname", home=home)
    assert control.returncode == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in control.stderr
    got = escort_run(cfg, plain, "hv-fra-1")
    assert isinstance(got, HostProblem) and got.code == KEY_CHANGED


# -- 2. keys as OpenSSH: agent first, encrypted files skipped, the fix named ----------------
def via_gw_config(lab: Lab, tmp_path: Path, known: Path, identity: Path | None = None) -> Path:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host gw\n  HostName {jump_ip(lab)}\n"
                   f"Host c-fra-1\n  HostName {ip(lab, 'fra-1')}\n  ProxyJump gw\n"
                   + common_block(known, identity))
    return cfg


def test_encrypted_identity_file_is_used_through_the_agent(
        lab: Lab, tmp_path: Path, home: Path, known: Path, agent: str, authorize: Any,
        monkeypatch: pytest.MonkeyPatch):
    """The README's example: ``identity_files = [passphrase-protected key]``, the key
    unlocked in ssh-agent. OpenSSH uses the agent; so does escort. Without the agent's
    copy both fail, and escort's one line names the file and ``ssh-add FILE``."""
    enc = keygen(tmp_path / "id_enc", "correct horse")
    authorize(enc.with_suffix(".pub"), "jump", *lab.hypervisors)
    ssh_add(agent, enc, "correct horse", tmp_path)
    monkeypatch.setenv("SSH_AUTH_SOCK", agent)
    cfg = via_gw_config(lab, tmp_path, known)
    control = openssh(cfg, "-i", str(enc), "c-fra-1", "hostname", home=home, agent=agent)
    assert control.returncode == 0 and control.stdout.strip() == "fra-1", control.stderr
    assert escort_run(cfg, known, "c-fra-1", identity_files=(str(enc),)) == "fra-1\n"
    # the whole fleet, through the CLI, as the README configures it
    fleet = _fleet(lab, tmp_path, "enc", config=cfg, known=known, identity_files=[str(enc)])
    env = {**os.environ, "HOME": str(home), "SSH_AUTH_SOCK": agent}
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json", env=env)
    rows = json.loads(out.stdout)["hosts"]
    assert out.returncode == 0 and all(r["reachable"] == "up" for r in rows), out.stdout
    # the agent forgets the key: OpenSSH and escort both fail; escort says what to do
    assert _run("ssh-add", "-D", env=_env(home, agent)).returncode == 0
    control = openssh(cfg, "-i", str(enc), "c-fra-1", "hostname", home=home, agent=agent)
    assert control.returncode == 255 and "Permission denied" in control.stderr
    got = escort_run(cfg, known, "c-fra-1", identity_files=(str(enc),))
    assert isinstance(got, HostProblem) and got.code == AUTH_FAILED
    assert f"{enc} is encrypted" in str(got) and f"ssh-add {enc}" in str(got)
    assert got.fix == f"ssh-add {enc}" and "Passphrase" not in str(got)
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json", env=env)
    rows = json.loads(out.stdout)["hosts"]
    assert out.returncode == 1
    for row in rows:
        assert row["problem"]["code"] == AUTH_FAILED, row
        assert row["problem"]["message"].startswith(f"{row['host']}: ")
        assert f"ssh-add {enc}" in row["problem"]["message"]


def test_agent_only(lab: Lab, tmp_path: Path, home: Path, known: Path, agent: str,
                    monkeypatch: pytest.MonkeyPatch):
    ssh_add(agent, lab.identity, "", tmp_path)
    monkeypatch.setenv("SSH_AUTH_SOCK", agent)
    cfg = via_gw_config(lab, tmp_path, known)  # no IdentityFile anywhere, empty HOME
    control = openssh(cfg, "c-fra-1", "hostname", home=home, agent=agent)
    assert control.returncode == 0 and control.stdout.strip() == "fra-1", control.stderr
    assert escort_run(cfg, known, "c-fra-1") == "fra-1\n"


def test_missing_identity_file_is_skipped_and_named(lab: Lab, tmp_path: Path, home: Path, known: Path):
    """OpenSSH warns about a missing ``-i`` file and goes on with the next one. (On the
    jump host itself: OpenSSH passes ``-i`` to the destination only, escort's
    identity_files go to every hop — see docs/SSH.md.)"""
    missing = tmp_path / "no_such_key"
    cfg = via_gw_config(lab, tmp_path, known)
    control = openssh(cfg, "-i", str(missing), "-i", str(lab.identity), "gw", "hostname", home=home)
    assert control.returncode == 0, control.stderr
    assert "not accessible" in control.stderr
    assert escort_run(cfg, known, "gw", identity_files=(str(missing), str(lab.identity))) == \
        control.stdout
    control = openssh(cfg, "-i", str(missing), "gw", "hostname", home=home)
    assert control.returncode == 255 and "Permission denied" in control.stderr
    got = escort_run(cfg, known, "gw", identity_files=(str(missing),))
    assert isinstance(got, HostProblem) and got.code == AUTH_FAILED
    assert f"identity file {missing} does not exist" in str(got), str(got)


@pytest.fixture
def silent_agent(tmp_path: Path) -> Iterator[str]:
    """A socket that accepts connections and never answers (a hung agent)."""
    import socket
    import threading

    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield str(path)
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        srv.close()


def test_an_agent_that_does_not_answer_is_left_out(lab: Lab, tmp_path: Path, home: Path, known: Path,
                                                   silent_agent: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", silent_agent)
    cfg = via_gw_config(lab, tmp_path, known)
    assert escort_run(cfg, known, "c-fra-1", identity_files=(str(lab.identity),),
                      agent_timeout=1) == "fra-1\n"
    enc = keygen(tmp_path / "id_enc", "pw")
    got = escort_run(cfg, known, "c-fra-1", identity_files=(str(enc),), agent_timeout=1)
    assert isinstance(got, HostProblem) and got.code == AUTH_FAILED
    assert f"the agent at {silent_agent} did not answer" in str(got) and f"ssh-add {enc}" in str(got)
    # the whole lab fleet (key files) still refreshes with the silent agent in SSH_AUTH_SOCK
    out = _escort_cli("hosts", "refresh", "--fleet", str(lab.fleet_file), "--json",
                      env={**os.environ, "HOME": str(home), "SSH_AUTH_SOCK": silent_agent})
    assert out.returncode == 0, out.stdout
    assert all(r["reachable"] == "up" for r in json.loads(out.stdout)["hosts"])


# -- 3. host keys as OpenSSH: host certificates, plain-key fallback, jump-host trust ---------
@pytest.fixture
def cert_host(lab: Lab, tmp_path: Path) -> Iterator[Any]:
    """fra-2 with a second sshd on CERT_PORT presenting a host certificate of its key."""
    host_ca, other_ca = keygen(tmp_path / "host_ca"), keygen(tmp_path / "other_ca")
    pub = tmp_path / "fra2_host.pub"
    pub.write_text(host_pub(lab, "fra-2") + "\n")

    def serve(*, ca: Path = host_ca, principals: str = "", validity: str = "-5m:+1h") -> None:
        cert = tmp_path / "fra2_host-cert.pub"
        cert.unlink(missing_ok=True)
        out = _run("ssh-keygen", "-q", "-s", str(ca), "-I", "fra-2", "-h",
                   "-n", principals or ip(lab, "fra-2"), "-V", validity, str(pub))
        assert out.returncode == 0, out.stderr
        lab.start_extra_sshd("fra-2", CERT_PORT, host_certificate=cert.read_bytes())

    try:
        yield type("CertHost", (), {"serve": staticmethod(serve), "ca": host_ca, "other_ca": other_ca,
                                    "pub": pub})
    finally:
        lab.stop_extra_sshd("fra-2", CERT_PORT)


def cert_config(lab: Lab, tmp_path: Path, known: Path) -> Path:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host gw\n  HostName {jump_ip(lab)}\n"
                   f"Host c-cert\n  HostName {ip(lab, 'fra-2')}\n  Port {CERT_PORT}\n  ProxyJump gw\n"
                   + common_block(known, lab.identity))
    return cfg


def test_host_certificates_as_openssh_checks_them(lab: Lab, tmp_path: Path, home: Path, cert_host: Any):
    known = tmp_path / "known_cert"
    cfg = cert_config(lab, tmp_path, known)
    jump_line = kh_line(jump_ip(lab), host_pub(lab, "jump"))
    plain_line = kh_line(f"[{ip(lab, 'fra-2')}]:{CERT_PORT}", host_pub(lab, "fra-2"))
    plain_fp = fingerprint(cert_host.pub)

    def ca_line(ca: Path) -> str:
        return "@cert-authority * " + " ".join(ca.with_suffix(".pub").read_text().split()[:2]) + "\n"

    def both(known_text: str) -> tuple[subprocess.CompletedProcess[str], str | HostProblem]:
        known.write_text(known_text)
        return openssh(cfg, "c-cert", "hostname", home=home), escort_run(cfg, known, "c-cert")

    cert_host.serve()
    # a correct certificate under @cert-authority (principal and validity checked): accepted
    control, got = both(jump_line + ca_line(cert_host.ca))
    assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr
    assert got == "fra-2\n"
    # trusted by its plain key only, while presenting a certificate: accepted
    control, got = both(jump_line + plain_line)
    assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr
    assert got == "fra-2\n"
    # nothing known: refused, and the fingerprint shown is the plain key's (hosts trust takes it)
    control, got = both(jump_line)
    assert control.returncode == 255 and "Host key verification failed" in control.stderr
    assert isinstance(got, HostProblem) and got.code == KEY_UNKNOWN and plain_fp in str(got)
    # a CA known_hosts does not list: its own code, and the fix is not ssh-keygen -R
    control, got = both(jump_line + ca_line(cert_host.other_ca))
    assert control.returncode == 255
    assert isinstance(got, HostProblem) and got.code == HOST_CERT_CA_UNKNOWN, got
    assert "@cert-authority" in str(got) and "ssh-keygen -R" not in str(got) + got.fix
    assert "CHANGED" not in str(got) and plain_fp in str(got)
    # the name escort connects to is not a principal of the certificate
    cert_host.serve(principals="some-other-name")
    control, got = both(jump_line + ca_line(cert_host.ca))
    assert control.returncode == 255
    assert "Certificate invalid: name is not a listed principal" in control.stderr
    assert isinstance(got, HostProblem) and got.code == HOST_CERT_PRINCIPAL, got
    assert "name is not a listed principal" in str(got) and "ssh-keygen -R" not in str(got) + got.fix
    assert ip(lab, "fra-2") in got.fix
    # `hosts trust` accepts the plain key beside that certificate (as OpenSSH would offer)
    async def trust(fp: str) -> str:
        pool = SshPool(known_hosts=str(known), config=str(cfg))
        try:
            return await pool.accept_host_key("c-cert", fp, name="c-cert")
        finally:
            await pool.close()
    added = asyncio.run(trust(plain_fp))
    assert added.startswith(f"[{ip(lab, 'fra-2')}]:{CERT_PORT} ssh-ed25519 ")
    assert escort_run(cfg, known, "c-cert") == "fra-2\n"
    control = openssh(cfg, "c-cert", "hostname", home=home)
    assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr
    # an expired certificate
    cert_host.serve(validity="20200101:20200102")
    control, got = both(jump_line + ca_line(cert_host.ca))
    assert control.returncode == 255 and "Certificate invalid: expired" in control.stderr
    assert isinstance(got, HostProblem) and got.code == HOST_CERT_EXPIRED, got
    assert "ssh-keygen -R" not in str(got) + got.fix and "renew" in got.fix
    # the plain key beside the failing certificate still works when known (OpenSSH's retry)
    control, got = both(jump_line + ca_line(cert_host.ca) + plain_line)
    assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr
    assert got == "fra-2\n"


def test_hosts_trust_accepts_the_plain_key_of_a_certificate_host(
        lab: Lab, tmp_path: Path, home: Path, cert_host: Any):
    """The fleet reaches fra-2 at its certificate-presenting sshd; known_hosts lacks it."""
    cert_host.serve()
    known = tmp_path / "known_trust"
    known.write_text(lab.known_hosts.read_text())  # fra-2's key on port 22 only
    cfg = cert_config(lab, tmp_path, known)
    # OpenSSH accepts the key found "without port identifier"; so does escort
    control = openssh(cfg, "c-cert", "hostname", home=home)
    assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr
    assert escort_run(cfg, known, "c-cert") == "fra-2\n"
    known.write_text("".join(line + "\n" for line in lab.known_hosts.read_text().splitlines()
                             if not line.startswith("fra-2,")))
    fleet = _fleet(lab, tmp_path, "certtrust", known=known,
                   hosts={"fra-2": {"ssh": f"root@{ip(lab, 'fra-2')}:{CERT_PORT}"}})
    env = {**os.environ, "HOME": str(home)}
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json", env=env)
    rows = {r["host"]: r for r in json.loads(out.stdout)["hosts"]}
    assert rows["fra-2"]["problem"]["code"] == KEY_UNKNOWN
    assert fingerprint(cert_host.pub) in rows["fra-2"]["problem"]["message"]
    assert rows["fra-1"]["reachable"] == "up"
    assert openssh(cfg, "c-cert", "hostname", home=home).returncode == 255  # the control agrees
    wrong = _escort_cli("hosts", "trust", "--fleet", str(fleet), "fra-2", "SHA256:notthekey", env=env)
    assert wrong.returncode != 0 and "nothing was added" in wrong.stderr
    right = _escort_cli("hosts", "trust", "--fleet", str(fleet), "fra-2", fingerprint(cert_host.pub),
                        env=env)
    assert right.returncode == 0 and "added to known_hosts" in right.stdout, right.stderr
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json", env=env)
    assert out.returncode == 0, out.stdout
    control = openssh(cfg, "c-cert", "hostname", home=home)  # OpenSSH accepts the added line
    assert control.returncode == 0 and control.stdout.strip() == "fra-2", control.stderr


def test_a_jump_hosts_key_is_trusted_with_hosts_trust(lab: Lab, tmp_path: Path, home: Path):
    known = tmp_path / "known_nojump"
    known.write_text("".join(line + "\n" for line in lab.known_hosts.read_text().splitlines()
                             if not line.startswith(f"{lab.name}-jump,")))
    fleet = _fleet(lab, tmp_path, "jumptrust", known=known)
    jump = f"root@{jump_ip(lab)}"
    jump_pub = tmp_path / "jump.pub"
    jump_pub.write_text(host_pub(lab, "jump") + "\n")
    fp = fingerprint(jump_pub)
    env = {**os.environ, "HOME": str(home)}
    cfg = tmp_path / "ssh_config"
    cfg.write_text(common_block(known, lab.identity))
    control = openssh(cfg, "-J", jump, f"root@{ip(lab, 'fra-1')}", "hostname", home=home)
    assert control.returncode == 255 and "Host key verification failed" in control.stderr
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json", env=env)
    rows = json.loads(out.stdout)["hosts"]
    assert out.returncode == 1
    for row in rows:
        assert row["problem"]["code"] == JUMP_FAILED
        assert f"escort hosts trust {jump} {fp}" in row["problem"]["fix"], row["problem"]
    # trusting a host behind it first says which key to accept
    behind = _escort_cli("hosts", "trust", "--fleet", str(fleet), "fra-1", "SHA256:x", env=env)
    assert behind.returncode != 0 and f"escort hosts trust {jump} {fp}" in behind.stderr
    wrong = _escort_cli("hosts", "trust", "--fleet", str(fleet), jump, "SHA256:notthekey", env=env)
    assert wrong.returncode != 0 and "nothing was added" in wrong.stderr
    right = _escort_cli("hosts", "trust", "--fleet", str(fleet), jump, fp, env=env)
    assert right.returncode == 0 and "added to known_hosts" in right.stdout, right.stderr
    out = _escort_cli("hosts", "refresh", "--fleet", str(fleet), "--json", env=env)
    assert out.returncode == 0, out.stdout
    control = openssh(cfg, "-J", jump, f"root@{ip(lab, 'fra-1')}", "hostname", home=home)
    assert control.returncode == 0 and control.stdout.strip() == "fra-1", control.stderr
    unknown = _escort_cli("hosts", "trust", "--fleet", str(fleet), "nowhere", fp, env=env)
    assert unknown.returncode == 2 and "no such host" in unknown.stderr


# -- 4. a question about VMs when hosts cannot be reached: exit 4, naming them ---------------
def test_targets_with_unreachable_hosts_is_a_connection_problem(lab: Lab, tmp_path: Path, home: Path):
    dead_jump = f"root@{jump_ip(lab)}:2999"  # nothing listens there
    fleet = _fleet(lab, tmp_path, "deadjump", hosts={n: {"jump": dead_jump} for n in lab.hypervisors})
    cfg = tmp_path / "ssh_config"
    cfg.write_text(common_block(lab.known_hosts, lab.identity))
    control = openssh(cfg, "-J", dead_jump, f"root@{ip(lab, 'par-1')}", "true", home=home)
    assert control.returncode == 255 and "Connection refused" in control.stderr
    env = {**os.environ, "HOME": str(home)}
    for cmd in (("targets", "app-1"), ("explain", "app-1", "fra-1")):
        out = _escort_cli(cmd[0], "--fleet", str(fleet), *cmd[1:], env=env)
        assert out.returncode == 4, out.stderr
        line = out.stderr.strip()
        assert "\n" not in line and "could not be reached" in line and "no VM 'app-1' in fleet" not in line
        for host in lab.hypervisors:
            assert host in line
    # the VM really missing while every host answers is still unusable input (exit 2)
    out = _escort_cli("targets", "--fleet", str(lab.fleet_file), "no-such-vm", env=env)
    assert out.returncode == 2 and "no VM 'no-such-vm'" in out.stderr
