"""Audit entries signed with the acting admin's SSH key (SSHSIG), checked by escort AND by
the real ``ssh-keygen -Y verify``; a rewritten-and-re-hashed log fails without --head;
every entry also goes to the local syslog socket with the tag ``escort``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.adapters import audit as audit_adapter
from console.adapters.audit import AuditLog, read_entries, verify_file
from console.cli import main
from console.core.audit import GENESIS, SIG_NAMESPACE, canonical_line, entry_hash, line_hash, parse_line
from console.core.inventory import AdminSpec
from console.services.identity import AdminIdentity, append_signed
from tests.unit.adminkeys import make_key


class _Fleet:
    kind = "lab"
    readonly = False
    spec = None

    def __init__(self, admins: dict[str, str]) -> None:
        self.admins = tuple(AdminSpec(a, fp) for a, fp in admins.items())

    def require_writable(self, action: str) -> None:
        pass


def signed_log(tmp_path: Path, n: int = 3, *, admin: str = "alice") -> tuple[Path, str]:
    """A log of ``n`` entries by ``admin``, each followed by its signature; returns (path, key fp)."""
    key, fp = make_key(tmp_path, admin)
    path = tmp_path / "audit.jsonl"

    async def go() -> None:
        ident = AdminIdentity(_Fleet({admin: fp}), admin_key=str(key), agent_path="")  # type: ignore[arg-type]
        proof = await ident.prove(admin, "test")
        with AuditLog(path) as log:
            for i in range(n):
                await append_signed(log, {"kind": "note", "admin": admin, "i": i}, proof)

    asyncio.run(go())
    return path, fp


def _rehash(lines: list[str]) -> list[str]:
    """What a careful forger does after editing: renumber, recompute every hash and every link."""
    out: list[str] = []
    prev = GENESIS
    for seq, text in enumerate(lines, 1):
        entry = parse_line(text)
        assert entry is not None
        entry["seq"] = seq
        entry["prev"] = prev
        entry["hash"] = entry_hash(entry)
        line = canonical_line(entry)
        out.append(line)
        prev = line_hash(line)
    return out


def test_signed_log_verifies_and_says_who_did_what(tmp_path: Path) -> None:
    path, fp = signed_log(tmp_path, 3)
    report = verify_file(path, admins={"alice": fp})
    assert report.ok, report.problems
    assert report.extra["signed_through"] == 5 and report.extra["signers"] == {fp: "alice"}
    assert report.extra["actions"] == {"alice": {"note": 3}}
    doc = report.as_json()
    assert {"ok", "entries", "head", "last_seq", "problems"} <= set(doc)  # the contract, extended only
    # bound to the wrong key in the fleet file: the signer is not that admin
    _, other = make_key(tmp_path, "other")
    wrong = verify_file(path, admins={"alice": other})
    assert not wrong.ok and {p.code for p in wrong.problems} >= {"audit.signer_unknown", "audit.unsigned"}


def test_edited_and_rehashed_log_fails_without_head(tmp_path: Path) -> None:
    path, fp = signed_log(tmp_path, 3)
    lines = path.read_text().splitlines()
    first = parse_line(lines[0])
    assert first is not None
    first["i"] = 99  # the edit
    forged = _rehash([canonical_line(first), *lines[1:]])
    path.write_text("\n".join(forged) + "\n")
    assert verify_file(path, signatures=False).ok  # hashes alone cannot see it
    report = verify_file(path, admins={"alice": fp})
    assert not report.ok
    assert "audit.signature" in {p.code for p in report.problems}
    # dropping the signatures too does not help: the entries are then unsigned
    stripped = _rehash([t for t in forged if json.loads(t)["kind"] != "signature"])
    path.write_text("\n".join(stripped) + "\n")
    report = verify_file(path, admins={"alice": fp})
    assert {p.code for p in report.problems} == {"audit.unsigned"}
    out = CliRunner().invoke(main, ["audit", "verify", str(path)])
    assert out.exit_code == 1 and "audit.unsigned" in out.output


def test_ssh_keygen_verifies_an_entry_signature(tmp_path: Path) -> None:
    path, fp = signed_log(tmp_path, 1)
    entry_line, sig_line = path.read_text().splitlines()
    sig = json.loads(sig_line)
    assert sig["kind"] == "signature" and sig["key"] == fp and sig["signs"] == line_hash(entry_line)
    (tmp_path / "entry.sig").write_text(sig["sshsig"])
    pub = (tmp_path / "alice_key.pub").read_text().split()
    (tmp_path / "allowed_signers").write_text(f"alice {pub[0]} {pub[1]}\n")
    done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed_signers"),
                           "-I", "alice", "-n", SIG_NAMESPACE, "-s", str(tmp_path / "entry.sig")],
                          input=entry_line.encode(), capture_output=True)
    assert done.returncode == 0, done.stderr
    assert b"Good" in done.stdout + done.stderr
    tampered = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed_signers"), "-I",
                               "alice", "-n", SIG_NAMESPACE, "-s", str(tmp_path / "entry.sig")],
                              input=entry_line.replace('"i":0', '"i":1').encode(), capture_output=True)
    assert tampered.returncode != 0


def test_cut_off_end_is_seen_against_the_outside_copy(tmp_path: Path) -> None:
    path, fp = signed_log(tmp_path, 3)
    copy = tmp_path / "copy.log"
    copy.write_text("".join(f"escort: {line}\n" for line in path.read_text().splitlines()))
    assert verify_file(path, admins={"alice": fp}, copy=copy).ok
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n")  # back to an earlier signature: looks fine alone
    assert verify_file(path, admins={"alice": fp}).ok
    report = verify_file(path, admins={"alice": fp}, copy=copy)
    assert [p.code for p in report.problems] == ["audit.copy_missing"]
    first = parse_line(lines[0])
    assert first is not None
    first["i"] = 7
    path.write_text("\n".join(_rehash([canonical_line(first), *lines[1:]])) + "\n")
    report = verify_file(path, admins={"alice": fp}, copy=copy)
    assert "audit.copy_mismatch" in {p.code for p in report.problems}


def test_every_entry_goes_to_syslog_with_tag_escort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(10)
    monkeypatch.setenv("ESCORT_SYSLOG_SOCKET", sock_path)
    monkeypatch.setattr(audit_adapter, "_SYSLOG", {})
    try:
        with AuditLog(tmp_path / "a.log") as log:
            entry = log.append({"kind": "note", "x": "y"})
        data = server.recv(65536).decode()
    finally:
        server.close()
    assert data.startswith("<") and "escort: " in data  # <priority>escort: line
    assert data.split("escort: ", 1)[1].rstrip("\x00\n") == canonical_line(entry)
    assert read_entries(tmp_path / "a.log") == [entry]


def test_no_syslog_socket_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_SYSLOG_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setattr(audit_adapter, "_SYSLOG", {})
    with AuditLog(tmp_path / "a.log") as log:
        log.append({"kind": "note"})
    assert os.path.exists(tmp_path / "a.log")




def test_trailing_lab_drill_is_a_warning_but_an_unsigned_action_is_not(tmp_path: Path) -> None:
    """`escort lab fault` records drills without an admin's key: a trailing one is a warning
    (audit.unsigned_drill); any other unsigned trailing entry still fails verify."""
    path, fp = signed_log(tmp_path, 1)
    with AuditLog(path) as log:
        log.append({"kind": "drill", "lab": "t1", "fault": "kill-libvirtd", "host": "par-1"})
    report = verify_file(path, admins={"alice": fp})
    assert report.ok, report.problems
    assert [w.code for w in report.warnings] == ["audit.unsigned_drill"]
    with AuditLog(path) as log:
        log.append({"kind": "fence", "admin": "alice", "vm": "web", "action": "pause"})
    report = verify_file(path, admins={"alice": fp})
    assert not report.ok and {p.code for p in report.problems} == {"audit.unsigned"}


def test_an_admin_cannot_sign_another_admins_action_into_the_log(tmp_path: Path) -> None:
    """Probe2 (lab): a second admin, mallory, appended "decision: lab-admin moved db-1 to rogue-1"
    and signed it with her own key; `audit verify --fleet` said ok and credited lab-admin."""
    path, alice_fp = signed_log(tmp_path, 2, admin="alice")
    key, mallory_fp = make_key(tmp_path, "mallory")
    admins = {"alice": alice_fp, "mallory": mallory_fp}

    async def forge() -> None:
        ident = AdminIdentity(_Fleet(admins), admin_key=str(key), agent_path="")  # type: ignore[arg-type]
        proof = await ident.prove("mallory", "test")
        with AuditLog(path) as log:
            forged = {"kind": "decision", "admin": "alice", "allowed": True, "vm": "db-1"}
            await append_signed(log, forged, proof)

    asyncio.run(forge())
    report = verify_file(path, admins=admins)
    assert [p.code for p in report.problems] == ["audit.signer_mismatch", "audit.unsigned"]
    assert report.extra["actions"].get("alice", {}).get("decision", 0) == 0
    r = CliRunner().invoke(main, ["audit", "verify", str(path)])
    assert r.exit_code == 1 and "signed by admin 'mallory'" in r.output
