"""Declared emergencies: signed by the admin's key, audited, time-limited; forged ones do not count."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.adapters.audit import AuditLog, read_entries, verify_file
from console.cli import main
from console.core.audit import canonical_line
from console.core.errors import InputError, ReadOnlyError
from console.services.emergency import declare, declared
from console.services.fleet import FleetService
from console.services.identity import AdminIdentity, AdminNotProven
from tests.unit.adminkeys import make_key
from tests.unit.trustkit import ANNE_KEY, build_fleet


def _fleet(tmp_path: Path) -> tuple[Path, Path, str]:
    files = build_fleet(tmp_path)
    key, fp = make_key(tmp_path, "anne")
    text = files.fleet.read_text().replace(ANNE_KEY, fp) + '\naudit_log = "audit.log"\n'
    # top-level keys must come before the tables: put audit_log first
    text = 'audit_log = "audit.log"\n' + text.replace('\naudit_log = "audit.log"\n', "\n")
    files.fleet.write_text(text)
    return files.fleet, key, fp


def test_declare_is_signed_audited_and_counts_until_it_ends(tmp_path: Path) -> None:
    fleet_path, key, fp = _fleet(tmp_path)
    fleet = FleetService.load(fleet_path)
    ident = AdminIdentity(fleet, admin_key=str(key), agent_path="")
    audit = AuditLog(tmp_path / "audit.log")
    start = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    em, proof = asyncio.run(declare(fleet, "hv-de-1", "rack fire", hours=2, admin="anne", identity=ident,
                                    audit=audit, now=start))
    audit.close()
    assert proof.admin == "anne" and em.end - em.start == dt.timedelta(hours=2)
    log = tmp_path / "audit.log"
    assert verify_file(log, admins={"anne": fp}).ok
    assert set(declared(fleet, log, start + dt.timedelta(minutes=5))) == {"hv-de-1"}
    assert declared(fleet, log, start + dt.timedelta(hours=2)) == {}  # ended
    assert declared(fleet, log, start - dt.timedelta(seconds=1)) == {}
    # a declaration edited afterwards (longer) no longer verifies: it does not count
    entries = read_entries(log)
    decl = next(e for e in entries if e["kind"] == "emergency")
    forged = {**decl, "until": "2026-06-01T20:00:00Z"}
    assert declared(fleet, log, start + dt.timedelta(hours=3), lines=[canonical_line(forged)]) == {}
    # signed by a key that is not the admin's in the fleet file: does not count either
    _, other = make_key(tmp_path, "other")
    text = fleet_path.read_text().replace(fp, other)
    fleet_path.write_text(text)
    assert declared(FleetService.load(fleet_path), log, start + dt.timedelta(minutes=5)) == {}


def test_declare_refusals(tmp_path: Path) -> None:
    fleet_path, key, _ = _fleet(tmp_path)
    fleet = FleetService.load(fleet_path)
    audit = AuditLog(tmp_path / "audit.log")
    with pytest.raises(InputError):
        asyncio.run(declare(fleet, "no-such-host", "x", audit=audit,
                            identity=AdminIdentity(fleet, admin_key=str(key), agent_path="")))
    with pytest.raises(InputError):
        asyncio.run(declare(fleet, "hv-de-1", "   ", audit=audit,
                            identity=AdminIdentity(fleet, admin_key=str(key), agent_path="")))
    with pytest.raises(AdminNotProven):  # no key: refused, and the refusal is audited
        asyncio.run(declare(fleet, "hv-de-1", "fire", admin="anne", audit=audit,
                            identity=AdminIdentity(fleet, agent_path="")))
    assert [e["kind"] for e in read_entries(tmp_path / "audit.log")] == ["refusal"]
    ro = FleetService.load(fleet_path, readonly=True)
    with pytest.raises(ReadOnlyError):
        asyncio.run(declare(ro, "hv-de-1", "fire", audit=audit,
                            identity=AdminIdentity(ro, admin_key=str(key), agent_path="")))
    audit.close()


def test_cli_declare_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet_path, key, _ = _fleet(tmp_path)
    monkeypatch.setenv("SSH_AUTH_SOCK", "")
    runner = CliRunner()
    out = runner.invoke(main, ["emergency", "declare", "hv-fr-1", "--fleet", str(fleet_path), "--reason",
                               "power", "--hours", "1", "--admin-key", str(key), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["host"] == "hv-fr-1"
    listed = runner.invoke(main, ["emergency", "list", "--fleet", str(fleet_path), "--json"])
    assert [e["host"] for e in json.loads(listed.output)] == ["hv-fr-1"]
    refused = runner.invoke(main, ["emergency", "declare", "hv-fr-1", "--fleet", str(fleet_path), "--reason",
                                   "power"])
    assert refused.exit_code == 1 and "admin." in refused.output
    bad = runner.invoke(main, ["emergency", "declare", "hv-fr-1", "--fleet", str(fleet_path), "--reason",
                               "power", "--hours", "500", "--admin-key", str(key)])
    assert bad.exit_code == 2


def test_host_key_trust_needs_the_admin_key_and_write_mode(tmp_path: Path) -> None:
    """`escort hosts trust` below the CLI: read-only and the proof are checked by the service."""
    from console.services.inventory import trust_host_key

    fleet_path, key, _ = _fleet(tmp_path)

    class Pool:
        def __init__(self) -> None:
            self.accepted: list[str] = []

        async def accept_host_key(self, ssh: str, fp: str, *, jump: str = "", name: str = "") -> str:
            self.accepted.append(fp)
            return f"{name} ssh-ed25519 AAAA"

    class Inventory:
        """InventoryService's trust_host_key, with the SSH part replaced (the SSH adapter's
        own tests cover accept_host_key against a real sshd)."""

        def __init__(self) -> None:
            self.pool = Pool()

        async def trust_host_key(self, name: str, fp: str) -> str:
            return await self.pool.accept_host_key("root@192.0.2.1", fp, name=name)

    inv = Inventory()
    ro = FleetService.load(fleet_path, readonly=True)
    with pytest.raises(ReadOnlyError):
        asyncio.run(trust_host_key(ro, inv, "hv-de-1", "SHA256:x",  # type: ignore[arg-type]
                                   identity=AdminIdentity(ro, admin_key=str(key), agent_path="")))
    fleet = FleetService.load(fleet_path)
    with pytest.raises(AdminNotProven):
        asyncio.run(trust_host_key(fleet, inv, "hv-de-1", "SHA256:x",  # type: ignore[arg-type]
                                   identity=AdminIdentity(fleet, agent_path="")))
    assert inv.pool.accepted == []
    line = asyncio.run(trust_host_key(fleet, inv, "hv-de-1", "SHA256:x",  # type: ignore[arg-type]
                                      identity=AdminIdentity(fleet, admin_key=str(key), agent_path="")))
    assert line and inv.pool.accepted == ["SHA256:x"]
    kinds = [e["kind"] for e in read_entries(tmp_path / "audit.log")]
    assert kinds == ["refusal", "host_key", "signature"]


def test_a_declaration_copied_into_another_fleets_log_does_not_count(tmp_path: Path) -> None:
    """Probe2 (lab): a declaration made in fleet A for host X, appended (chain re-hashed) to
    fleet B's log, let an emergency-only grant evacuate X in fleet B. It must count only in
    the log it was declared in, at its place there, and only for the fleet it names."""
    fleet_path, key, _ = _fleet(tmp_path)
    fleet = FleetService.load(fleet_path)
    ident = AdminIdentity(fleet, admin_key=str(key), agent_path="")
    start = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    during = start + dt.timedelta(minutes=5)
    with AuditLog(tmp_path / "audit.log") as audit:
        asyncio.run(declare(fleet, "hv-de-1", "rack fire", hours=2, admin="anne", identity=ident,
                            audit=audit, now=start))
    assert set(declared(fleet, tmp_path / "audit.log", during)) == {"hv-de-1"}
    decl = next(e for e in read_entries(tmp_path / "audit.log") if e["kind"] == "emergency")
    # another fleet's log (same admin key, a host of the same name) with its own history
    other = tmp_path / "other.log"
    with AuditLog(other) as log:
        log.append({"kind": "note", "text": "the other fleet's history"})
        log.append({k: v for k, v in decl.items() if k not in ("seq", "ts", "prev", "hash")})
    assert verify_file(other, signatures=False).ok  # a perfectly linked chain ...
    assert declared(fleet, other, during) == {}  # ... but no audit signature of anne over that line
    # the exact line and its signature copied over: the link to the line before it is broken
    lines = (tmp_path / "audit.log").read_text().splitlines()
    i = next(n for n, t in enumerate(lines) if '"kind":"emergency"' in t)
    foreign = [other.read_text().splitlines()[0], *lines[i:]]
    assert declared(fleet, other, during, lines=foreign) == {}
    # a fleet of another name does not accept it even in the original log
    renamed = tmp_path / "renamed.toml"
    renamed.write_text(fleet_path.read_text().replace(f'name = "{fleet.name}"', 'name = "prod"', 1))
    assert FleetService.load(renamed).name == "prod"
    assert declared(FleetService.load(renamed), tmp_path / "audit.log", during) == {}
