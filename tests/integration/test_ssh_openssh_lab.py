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
    JUMP_LOOP,
    KEY_CHANGED,
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
