"""`escort hosts refresh` against the real lab: through the jump host, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab


def _escort(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True,
                          timeout=120)


def test_refresh_shows_every_host_and_the_rogue_reason(lab: Lab) -> None:
    out = _escort("hosts", "refresh", "--fleet", str(lab.fleet_file), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = {r["host"]: r for r in doc["hosts"]}
    assert doc["kind"] == "lab"
    assert set(rows) == set(lab.hypervisors)
    assert all(r["reachable"] == "up" for r in rows.values())
    assert rows["fra-1"]["cert_valid"] is True and rows["fra-1"]["vms"] >= 1
    assert rows["rogue-1"]["cert_valid"] is False
    assert rows["rogue-1"]["cert_reasons"][0]["code"] == "chain.no_issuer"


def test_refresh_with_one_sshd_down_exits_1_and_names_the_host(lab: Lab) -> None:
    lab.stop_sshd("par-1")
    try:
        out = _escort("hosts", "refresh", "--fleet", str(lab.fleet_file))
    finally:
        lab.start_sshd("par-1")
    assert out.returncode == 1
    lines = {line.split()[1]: line for line in out.stdout.splitlines()}
    assert lines["par-1"].startswith("✗") and "down" in lines["par-1"]
    assert lines["fra-1"].startswith("✓")
    assert "Traceback" not in out.stderr


def test_trust_adds_an_unknown_key_only_with_its_fingerprint(lab: Lab, tmp_path: Path) -> None:
    """A fleet whose known_hosts lacks fra-1: refused until the right fingerprint is typed."""
    from console.lab import ssh_fingerprint

    known = tmp_path / "known_hosts"
    lines = lab.known_hosts.read_text().splitlines(keepends=True)
    known.write_text("".join(line for line in lines if not line.startswith("fra-1,")))
    # beside the lab's own fleet file, so its relative paths still resolve
    fleet = lab.fleet_file.with_name("fleet-without-fra-1-key.toml")
    fleet.write_text(lab.fleet_file.read_text().replace('known_hosts = "known_hosts"',
                                                        f'known_hosts = "{known}"'))
    out = _escort("hosts", "refresh", "--fleet", str(fleet), "--json")
    rows = {r["host"]: r for r in json.loads(out.stdout)["hosts"]}
    assert rows["fra-1"]["problem"]["code"] == "host.key_unknown"
    assert rows["fra-2"]["reachable"] == "up"
    before = known.read_bytes()
    wrong = _escort("hosts", "trust", "--fleet", str(fleet), "fra-1", "SHA256:notthekey")
    assert wrong.returncode != 0 and "nothing was added" in wrong.stderr
    assert known.read_bytes() == before
    pub = (lab.host("fra-1").root / "etc/ssh/ssh_host_ed25519_key.pub").read_bytes()
    right = _escort("hosts", "trust", "--fleet", str(fleet), "fra-1", ssh_fingerprint(pub))
    assert right.returncode == 0, right.stderr
    assert "added to known_hosts" in right.stdout
    again = _escort("hosts", "refresh", "--fleet", str(fleet), "--json")
    assert again.returncode == 0, again.stdout


def test_trust_of_a_known_key_changes_nothing(lab: Lab) -> None:
    before = lab.known_hosts.read_bytes()
    out = _escort("hosts", "trust", "--fleet", str(lab.fleet_file), "fra-1", "SHA256:notthekey")
    # fra-1's key is already known: nothing to add, and nothing was changed either way
    assert out.returncode == 0, out.stderr
    assert "already trusted" in out.stdout
    assert lab.known_hosts.read_bytes() == before
    bad = _escort("hosts", "trust", "--fleet", str(lab.fleet_file), "fra-1", "md5:abc")
    assert bad.returncode == 2 and bad.stderr.startswith("escort: ")


def test_targets_and_explain_read_vms_live_from_libvirt(lab: Lab) -> None:
    """Lab VMs live only in libvirt: the CLI refreshes before answering."""
    out = _escort("targets", "--fleet", str(lab.fleet_file), "web-1", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    refused = {r["host"]: [x["code"] for x in r["reasons"]] for r in doc["refused"]}
    assert "chain.no_issuer" in refused["rogue-1"]
    assert set(doc["allowed"]) <= {"fra-1", "fra-2", "par-1"} and doc["allowed"]
    offline = _escort("targets", "--fleet", str(lab.fleet_file), "web-1", "--offline")
    assert offline.returncode == 2 and "no VM 'web-1'" in offline.stderr
    explain = _escort("explain", "--fleet", str(lab.fleet_file), "web-1", "rogue-1", "--json")
    assert explain.returncode == 1
    assert not json.loads(explain.stdout)["allowed"]
