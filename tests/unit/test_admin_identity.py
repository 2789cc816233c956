"""Proof of possession of the acting admin's SSH key, with a REAL ssh-agent and ssh-keygen.

Every refusal is one line with its own code and a fix naming the key needed; a proof
is a fresh challenge signed by the key and verified against the fleet file's
fingerprint. Signatures are standard SSHSIG: ``ssh-keygen -Y verify`` accepts them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from console.adapters import adminkey as ak
from console.core.errors import InputError
from console.core.inventory import AdminSpec
from console.services.identity import AdminIdentity, AdminNotProven, is_proof, require_admin
from tests.unit.adminkeys import make_key


class Fleet:
    """The part of a FleetService identity needs: admins, identity files, read-only."""

    kind = "lab"
    readonly = False

    def __init__(self, admins: dict[str, str], identity_files: tuple[str, ...] = ()) -> None:
        self.admins = tuple(AdminSpec(a, fp) for a, fp in admins.items())
        self.spec = type("Spec", (), {"identity_files": identity_files})()

    def require_writable(self, action: str) -> None:
        if self.readonly:
            from console.core.errors import ReadOnlyError

            raise ReadOnlyError(f"read-only mode: {action} is disabled")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[str]:
    """A real ssh-agent on a socket of its own; killed afterwards."""
    sock = str(tmp_path / "agent.sock")
    out = subprocess.run(["ssh-agent", "-a", sock, "-s"], capture_output=True, text=True, check=True).stdout
    pid = int(out.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        yield sock
    finally:
        os.kill(pid, signal.SIGTERM)


def ssh_add(sock: str, key: Path) -> None:
    subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": sock}, check=True,
                   capture_output=True)


def ident(fleet: Fleet, **kw: Any) -> AdminIdentity:
    return AdminIdentity(fleet, **kw)  # type: ignore[arg-type]


async def test_agent_key_proves_the_admin(tmp_path: Path, agent: str) -> None:
    key, fp = make_key(tmp_path, "alice")
    ssh_add(agent, key)
    fleet = Fleet({"alice": fp})
    proof = await ident(fleet, agent_path=agent).prove("alice", "test")
    assert (proof.admin, proof.fingerprint, proof.source) == ("alice", fp, "ssh-agent")
    assert is_proof(proof, "alice") and not is_proof(proof, "bob")
    assert len(proof.challenge_sha256) == 64


async def test_admin_may_be_omitted_when_exactly_one_key_is_present(tmp_path: Path, agent: str) -> None:
    a_key, a_fp = make_key(tmp_path, "alice")
    b_key, b_fp = make_key(tmp_path, "bob")
    _, m_fp = make_key(tmp_path, "mallory")
    ssh_add(agent, a_key)
    fleet = Fleet({"alice": a_fp, "bob": b_fp, "mallory": m_fp})
    assert (await ident(fleet, agent_path=agent).prove(None)).admin == "alice"
    avail = await ident(fleet, agent_path=agent).available()
    assert set(avail.present) == {"alice"} and set(avail.missing) == {"bob", "mallory"}
    assert avail.missing["mallory"].code == "admin.key_missing" and m_fp in avail.missing["mallory"].message
    ssh_add(agent, b_key)
    with pytest.raises(InputError, match="--admin"):
        await ident(fleet, agent_path=agent).prove(None)


async def test_agent_without_the_key_is_refused_naming_it(tmp_path: Path, agent: str) -> None:
    other, _ = make_key(tmp_path, "other")
    ssh_add(agent, other)
    _, m_fp = make_key(tmp_path, "mallory")
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"mallory": m_fp}), agent_path=agent).prove("mallory")
    assert err.value.code == "admin.key_missing"
    assert m_fp in str(err.value) and "\n" not in str(err.value) and m_fp in err.value.fix


async def test_no_agent_and_no_key_file(tmp_path: Path) -> None:
    _, fp = make_key(tmp_path, "alice")
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="").prove("alice")
    assert err.value.code == "admin.no_agent" and "SSH_AUTH_SOCK" in str(err.value)
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path=str(tmp_path / "no-such.sock")).prove("alice")
    assert err.value.code == "admin.no_agent"


async def test_key_file_and_identity_files(tmp_path: Path) -> None:
    key, fp = make_key(tmp_path, "alice")
    proof = await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(key)).prove("alice")
    assert proof.source == str(key)
    proof = await ident(Fleet({"alice": fp}, (str(key),)), agent_path="").prove(None)
    assert proof.admin == "alice"


async def test_encrypted_key_without_a_prompt_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "enc"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(path)], check=True)
    fp = str(asyncssh.read_public_key(str(path) + ".pub").get_fingerprint("sha256"))
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(path)).prove("alice")
    assert err.value.code == "admin.key_encrypted" and "ssh-add" in err.value.fix
    with pytest.raises(AdminNotProven) as err:  # as an identity file: still names it
        await ident(Fleet({"alice": fp}, (str(path),)), agent_path="").prove("alice")
    assert err.value.code == "admin.key_encrypted" and str(path) in str(err.value)


async def test_wrong_key_types_are_refused(tmp_path: Path) -> None:
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=1024)
    weak.write_private_key(str(tmp_path / "weak"))
    (tmp_path / "weak").chmod(0o600)
    fp = str(weak.get_fingerprint("sha256"))
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(tmp_path / "weak")).prove("alice")
    assert err.value.code == "admin.key_type"
    not_a_key = tmp_path / "cert.pem"
    not_a_key.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(not_a_key)).prove("alice")
    assert err.value.code == "admin.key_type"


async def test_a_different_key_given_explicitly_is_a_mismatch(tmp_path: Path) -> None:
    key, _ = make_key(tmp_path, "other")
    _, fp = make_key(tmp_path, "alice")
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(key)).prove("alice")
    assert err.value.code == "admin.key_missing" and fp in str(err.value)


async def test_refusal_is_audited_and_read_only_comes_first(tmp_path: Path) -> None:
    _, fp = make_key(tmp_path, "alice")
    fleet = Fleet({"alice": fp})
    written: list[dict[str, Any]] = []

    async def append(e: dict[str, Any]) -> None:
        written.append(e)

    with pytest.raises(AdminNotProven):
        await require_admin(fleet, "migrate x", admin="alice",  # type: ignore[arg-type]
                            identity=ident(fleet, agent_path=""), audit=append)
    assert written == [{"kind": "refusal", "action": "migrate x", "admin": "alice", "code": "admin.no_agent",
                        "message": written[0]["message"]}]
    fleet.readonly = True
    from console.core.errors import ReadOnlyError

    with pytest.raises(ReadOnlyError):
        await require_admin(fleet, "migrate x", admin="alice",  # type: ignore[arg-type]
                            identity=ident(fleet, agent_path=""), audit=append)


@pytest.mark.parametrize("alg", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"])
async def test_sshsig_is_accepted_by_ssh_keygen(tmp_path: Path, agent: str, alg: str) -> None:
    key, fp = make_key(tmp_path, "alice", alg)
    ssh_add(agent, key)
    agent_keys = await ak.agent_keys(agent)
    file_key = ak.load_key_file(str(key))
    try:
        for signer in (ak.matching(agent_keys.keys, fp), file_key):
            assert signer is not None
            message = b'{"kind":"decision","seq":1}'
            sig = await signer.sshsig(message, ak.NS_AUDIT)
            assert ak.sshsig_verify(sig, message, ak.NS_AUDIT) == fp
            with pytest.raises(ak.AdminKeyProblem):
                ak.sshsig_verify(sig, message + b" ", ak.NS_AUDIT)
            (tmp_path / "sig").write_text(sig)
            (tmp_path / "allowed").write_text(f"alice {signer.public_line()}\n")
            done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"),
                                   "-I", "alice", "-n", ak.NS_AUDIT, "-s", str(tmp_path / "sig")],
                                  input=message, capture_output=True)
            assert done.returncode == 0, done.stderr
    finally:
        agent_keys.close()


def test_ssh_keygen_signature_verifies_here(tmp_path: Path) -> None:
    """The other direction: a signature made by ssh-keygen -Y sign verifies with ours."""
    key, fp = make_key(tmp_path, "alice")
    msg = tmp_path / "msg"
    msg.write_bytes(b"hello")
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", ak.NS_AUDIT, str(msg)],
                   check=True, capture_output=True)
    assert ak.sshsig_verify((tmp_path / "msg.sig").read_text(), b"hello", ak.NS_AUDIT) == fp
    with pytest.raises(ak.AdminKeyProblem):
        ak.sshsig_verify((tmp_path / "msg.sig").read_text(), b"hello", ak.NS_PROOF)




async def test_agent_proof_still_signs_after_the_listing_connection_closed(tmp_path: Path,
                                                                           agent: str) -> None:
    """Audit entries are signed minutes after the proof: the agent is asked again each time."""
    key, fp = make_key(tmp_path, "alice")
    ssh_add(agent, key)
    proof = await ident(Fleet({"alice": fp}), agent_path=agent).prove("alice")
    sig = await proof.sign(b"line")
    assert ak.sshsig_verify(sig, b"line", ak.NS_AUDIT) == fp
    subprocess.run(["ssh-add", "-q", "-D"], env={**os.environ, "SSH_AUTH_SOCK": agent}, check=True,
                   capture_output=True)
    with pytest.raises(AdminNotProven) as err:  # the key left the agent: said, not hidden
        await proof.sign(b"line")
    assert err.value.code == "admin.key_missing"


async def test_a_clock_far_behind_the_audit_log_is_refused(tmp_path: Path) -> None:
    import datetime as dt

    from console.services.identity import clock_check_against

    key, fp = make_key(tmp_path, "alice")
    fleet = Fleet({"alice": fp})
    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    written: list[dict[str, Any]] = []
    with pytest.raises(AdminNotProven) as err:
        await require_admin(fleet, "migrate x", admin="alice",  # type: ignore[arg-type]
                            identity=ident(fleet, agent_path="", admin_key=str(key)), audit=written.append,
                            clock_check=lambda: clock_check_against(ahead))
    assert err.value.code == "time.clock_off" and "behind" in str(err.value)
    assert [e["code"] for e in written] == ["time.clock_off"]
    clock_check_against(dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))  # in step: fine


async def test_a_weak_admin_key_file_is_named_when_no_admin_is_given(tmp_path: Path) -> None:
    """Probe2: `--admin-key weak-rsa-1024` without --admin said "no admin's key is present (no SSH
    agent ...)", not what was wrong with the key file given."""
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=1024)
    weak.write_private_key(str(tmp_path / "weak"))
    (tmp_path / "weak").chmod(0o600)
    fp = str(weak.get_fingerprint("sha256"))
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(tmp_path / "weak")).prove(None)
    assert err.value.code == "admin.key_type" and "1024 bits" in str(err.value)


def _lying_agent(sock: str, listed: asyncssh.SSHKey, signer: asyncssh.SSHKey) -> Callable[[], None]:
    """An SSH agent (plain socket, threads) that lists ``listed`` but signs with ``signer``.
    Returns its stop: call it (the accept thread ends), or later tests see a live thread, and
    the console's helper process (which forks only while no other thread runs) stays off."""
    import socket
    import struct
    import threading

    def s(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    def serve(c: socket.socket) -> None:
        with c:
            while len(hdr := c.recv(4)) == 4:
                (n,) = struct.unpack(">I", hdr)
                msg = b""
                while len(msg) < n:
                    msg += c.recv(n - len(msg))
                if msg[0] == 11:  # list identities
                    body = bytes([12]) + struct.pack(">I", 1) + s(bytes(listed.public_data)) + s(b"alice")
                elif msg[0] == 13:  # sign: key blob, data, flags
                    (kn,) = struct.unpack(">I", msg[1:5])
                    (dn,) = struct.unpack(">I", msg[5 + kn:9 + kn])
                    data = msg[9 + kn:9 + kn + dn]
                    body = bytes([14]) + s(bytes(signer.sign(data, b"ssh-ed25519")))
                else:
                    body = bytes([5])
                c.sendall(s(body))

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sock)
    srv.listen(4)

    def accept() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def stop() -> None:
        import contextlib

        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        thread.join(10)

    return stop


async def test_an_agent_listing_the_admins_key_but_signing_with_another_is_a_mismatch(tmp_path: Path) -> None:
    """Probe2: a fake agent listing alice's public key and signing with mallory's was refused, but as
    `signature.invalid` "the entry or the signature was changed" (no entry is involved)."""
    alice = asyncssh.generate_private_key("ssh-ed25519")
    mallory = asyncssh.generate_private_key("ssh-ed25519")
    sock = str(tmp_path / "lying.sock")
    stop = _lying_agent(sock, alice, mallory)
    fp = str(alice.get_fingerprint("sha256"))
    try:
        with pytest.raises(AdminNotProven) as err:
            await ident(Fleet({"alice": fp}), agent_path=sock).prove("alice")
    finally:
        stop()
    assert err.value.code == "admin.key_mismatch" and "fresh challenge" in str(err.value)


async def test_a_private_key_others_can_read_proves_nothing(tmp_path: Path) -> None:
    """Probe2: a copy of the admin's key left world-readable (ssh: "UNPROTECTED PRIVATE KEY
    FILE", refused) was accepted by escort as proof of who acts, via --admin-key or identity_files."""
    key, fp = make_key(tmp_path, "alice")
    key.chmod(0o644)
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(key)).prove("alice")
    assert err.value.code == "admin.key_unprotected" and "0644" in str(err.value)
    with pytest.raises(AdminNotProven) as err:
        await ident(Fleet({"alice": fp}, (str(key),)), agent_path="").prove("alice")
    assert "too open" in str(err.value)
    key.chmod(0o600)
    proof = await ident(Fleet({"alice": fp}), agent_path="", admin_key=str(key)).prove("alice")
    assert proof.admin == "alice"


def test_a_named_pipe_given_as_the_key_is_refused_at_once(tmp_path: Path) -> None:
    """Probe2: `--admin-key FIFO` hung `escort emergency declare` (and would the console's
    "Act as" for a FIFO in identity_files) in open() for good."""
    import threading

    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    out: list[BaseException | None] = []

    def load() -> None:
        try:
            ak.load_key_file(str(fifo))
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(3)
    assert out, "load_key_file is still blocked on the FIFO"
    assert isinstance(out[0], ak.AdminKeyProblem) and out[0].code == "admin.key_unreadable"
    assert "not a regular file" in str(out[0])
