"""Proof of possession on the lab, with a REAL ssh-agent and keys made by ssh-keygen.

The "mallory" case from issue 11: an admin is added to the fleet file with the
fingerprint of a key the operator does not hold, and alice (app-1's owner) signs
mallory a grant. ``escort migrate ... --admin mallory`` must be refused (exit 1,
app-1 stays where it is, the refusal is in the audit log). With mallory's key in the
agent, the same command, run seconds after the grant was signed, moves app-1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tomli_w

from console.adapters.audit import read_entries, verify_file
from console.core.grants import AdminRef, build_grant_payload, sign_grant

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

VM = "app-1"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[str]:
    sock = str(tmp_path / "agent.sock")
    out = subprocess.run(["ssh-agent", "-a", sock, "-s"], capture_output=True, text=True, check=True).stdout
    pid = int(out.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        yield sock
    finally:
        os.kill(pid, signal.SIGTERM)


def _where(lab: Lab, name: str) -> list[str]:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    hosts = []
    for host in lab.hypervisors:
        conn = lab.open_libvirt(host)
        try:
            dom = conn.lookupByName(name)
            if dom.isActive():
                hosts.append(host)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return hosts


def _sign_grant(lab: Lab, path: Path, admin: str, fp: str) -> None:
    """alice grants ``admin`` her "app" VMs, valid from this very second."""
    from console.lab import certs

    pki = lab.pki or certs.load(lab.pki_dir)
    owner = pki.owners["alice"]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner="alice", admin=AdminRef(admin, ssh_key=fp), label="app",
                                  not_before=now, not_after=now + dt.timedelta(hours=1))
    path.write_text(sign_grant(payload, owner.key, [owner.cert]) + "\n")


def _escort(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SSH_AUTH_SOCK": sock}
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True,
                          timeout=240, env=env, stdin=subprocess.DEVNULL)


def _with_mallory(lab: Lab, tmp_path: Path) -> tuple[Path, str, dict[str, Any]]:
    """A fresh key for "mallory" (made by ssh-keygen, held by nobody yet) and the lab's
    fleet document with mallory added as an admin: (key file, fingerprint, fleet doc)."""
    key = tmp_path / "mallory"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mallory", "-f", str(key)],
                   check=True)
    fp = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True,
                        check=True).stdout.split()[1]
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    doc["admins"] = [*doc["admins"], {"id": "mallory", "ssh_key_fingerprint": fp}]
    return key, fp, doc


def test_mallory_without_the_key_is_refused_and_with_it_moves(lab: Lab, tmp_path: Path,
                                                              agent: str) -> None:
    key, fp, doc = _with_mallory(lab, tmp_path)
    grants = lab.dir / "mallory-grants"
    grants.mkdir(exist_ok=True)
    doc["grants"] = [*doc.get("grants", []), "mallory-grants"]
    audit = tmp_path / "audit.log"
    doc["audit_log"] = str(audit)
    fleet = lab.dir / "fleet-mallory.toml"
    fleet.write_text(tomli_w.dumps(doc), encoding="utf-8")
    (source,) = _where(lab, VM)
    target = "fra-1" if source != "fra-1" else "par-1"
    _sign_grant(lab, grants / "mallory-app.jws", "mallory", fp)

    # 1. the operator does not hold mallory's key: refused before anything happens
    out = _escort(agent, "migrate", "--fleet", str(fleet), VM, target, "--admin", "mallory", "--yes",
                  "--json")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == ""  # not even a pre-flight was run
    line = out.stderr.strip()
    assert "\n" not in line and "admin.key_missing" in line and fp in line, line
    assert _where(lab, VM) == [source]
    assert verify_file(audit).ok
    (entry,) = read_entries(audit)
    assert (entry["kind"], entry["admin"], entry["code"]) == ("refusal", "mallory", "admin.key_missing")

    # 2. with mallory's key in the agent, a grant signed just now: the same command moves app-1
    subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": agent}, check=True,
                   capture_output=True)
    _sign_grant(lab, grants / "mallory-app.jws", "mallory", fp)
    try:
        out = _escort(agent, "migrate", "--fleet", str(fleet), VM, target, "--admin", "mallory", "--yes",
                      "--json")
        assert out.returncode == 0, (out.stdout, out.stderr)
        events = [json.loads(x) for x in out.stdout.splitlines()]
        assert events[-1]["event"] == "outcome" and events[-1]["result"] == "success"
        assert _where(lab, VM) == [target]
        decision = next(e for e in read_entries(audit) if e["kind"] == "decision")
        assert decision["admin"] == "mallory" and decision["proof"]["key"] == fp
        assert decision["proof"]["source"] == "ssh-agent"
        assert verify_file(audit).ok
    finally:
        if _where(lab, VM) != [source]:
            back = _escort(agent, "migrate", "--fleet", str(fleet), VM, source, "--admin", "mallory",
                           "--yes", "--json")
            assert back.returncode == 0, (back.stdout, back.stderr)
        (grants / "mallory-app.jws").unlink(missing_ok=True)


def test_guard_remove_needs_the_admins_key(lab: Lab, tmp_path: Path, agent: str) -> None:
    """Removing a host's guard weakens enforcement: without the acting admin's key it is
    refused before anything changes on the host, and the refusal is audited."""
    _key, _fp, doc = _with_mallory(lab, tmp_path)
    audit = tmp_path / "audit.log"
    doc["audit_log"] = str(audit)
    fleet = lab.dir / "fleet-mallory-guard.toml"
    fleet.write_text(tomli_w.dumps(doc), encoding="utf-8")

    out = _escort(agent, "hosts", "guard", "remove", "--fleet", str(fleet), "fra-2", "--admin", "mallory")
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = out.stderr.strip()
    assert "\n" not in line and "admin.key_missing" in line, line
    st = _escort(agent, "hosts", "guard", "status", "--fleet", str(fleet), "--offline", "--json", "fra-2")
    (row,) = json.loads(st.stdout)["hosts"]
    assert row["state"] != "missing", row  # the guard is still on fra-2
    (entry,) = read_entries(audit)
    assert (entry["kind"], entry["admin"], entry["code"]) == ("refusal", "mallory", "admin.key_missing")
    assert verify_file(audit).ok
